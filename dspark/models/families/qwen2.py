"""Qwen2 / Qwen2.5: q/k/v projections always carry a bias, o_proj never does."""

from dspark.models.families import ModelFamily, register


def _unsupported(hf):
    if hf.get("use_sliding_window"):
        return "use_sliding_window=true (sliding-window attention) is not supported"
    return None


register(
    ModelFamily(
        name="qwen2",
        architectures=("Qwen2ForCausalLM",),
        model_types=("qwen2",),
        qkv_bias=lambda hf: True,
        unsupported_reason=_unsupported,
    )
)
