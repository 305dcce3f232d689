"""The built-in model's pipeline (`dspark zoo rebuild`): corpus → tokenizer → pretrained target →
regenerated data → drafters → calibration, each step resumable (`zoo_build.rebuild`). It uses the
training, evaluation and calibration packages; nothing but the commands uses it."""
