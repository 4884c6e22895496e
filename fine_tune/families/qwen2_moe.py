"""Qwen2-MoE (Qwen/Qwen1.5-MoE-A2.7B): biases on q/k/v, 60 narrow experts (top-4) plus a shared
expert (a dense MLP, gated by `shared_expert_gate`) in every sparse layer; `mlp_only_layers` and
`decoder_sparse_step` may leave some layers dense (of `intermediate_size`).

The planner applies Mixtral's measured coefficients: Qwen2-MoE itself was not measured."""

from fine_tune.families import CheckpointExperts, Family

FAMILY = Family(
    name="qwen2_moe",
    config_class="Qwen2MoeConfig",
    model_types=("qwen2_moe",),
    reference={  # Qwen1.5-MoE-A2.7B (= Qwen2MoeConfig's defaults)
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "qkv_bias": True,
        "tie_word_embeddings": False,
    },
    calibration="mixtral",
    decoder_layer="Qwen2MoeDecoderLayer",
    expert_intermediate_key="moe_intermediate_size",
    checkpoint_experts=CheckpointExperts(block="mlp", gate="gate_proj", up="up_proj", down="down_proj"),
)
