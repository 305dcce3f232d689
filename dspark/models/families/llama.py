"""Llama 2 / 3 / 3.1+: `attention_bias` switches q/k/v/o biases, `mlp_bias` the MLP biases."""

from dspark.models.families import ModelFamily, register

register(
    ModelFamily(
        name="llama",
        architectures=("LlamaForCausalLM",),
        model_types=("llama",),
        qkv_bias=lambda hf: bool(hf.get("attention_bias", False)),
        o_bias=lambda hf: bool(hf.get("attention_bias", False)),
        mlp_bias=lambda hf: bool(hf.get("mlp_bias", False)),
    )
)
