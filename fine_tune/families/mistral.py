"""Mistral (mistralai/Mistral-7B-v0.1): dense, grouped-query attention, no biases."""

from fine_tune.families import Family

FAMILY = Family(
    name="mistral",
    config_class="MistralConfig",
    model_types=("mistral",),
    reference={  # Mistral-7B (= MistralConfig's defaults)
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
    },
    calibration="mistral",
    decoder_layer="MistralDecoderLayer",
)
