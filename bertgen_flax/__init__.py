"""bertgen-flax: BertGeneration (bert2bert, roberta2roberta, BERTShare) in JAX/Flax, equal to transformers."""
from .config import BertGenerationConfig, ConfigError, EncoderDecoderConfig, load_config
from .checkpoints import CheckpointError
from .convert import ConversionError, Report
from .decoding import GenerationConfig
from .generation import enable_compilation_cache
from .models import BertGenerationDecoder, BertGenerationEncoder, EncoderDecoderModel
from .pipeline import InputTooLongError, Text2TextGenerator
from .quantization import quantize_params
from .tokenization import (AutoTokenizer, BertGenerationTokenizer, BertTokenizer, RobertaTokenizer,
                           TokenizerError)

__all__ = [
    "BertGenerationConfig", "EncoderDecoderConfig", "load_config", "ConfigError", "CheckpointError",
    "ConversionError", "Report", "BertGenerationEncoder", "BertGenerationDecoder", "EncoderDecoderModel",
    "AutoTokenizer", "BertGenerationTokenizer", "BertTokenizer", "RobertaTokenizer", "TokenizerError",
    "GenerationConfig", "Text2TextGenerator", "InputTooLongError", "enable_compilation_cache",
    "quantize_params",
]
__version__ = "0.1.0"
