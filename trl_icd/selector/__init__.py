"""The ICD selector: a pointer policy packaged as a Hugging Face causal LM that TRL samples and scores exactly."""

from .configuration import ICDSelectorConfig  # noqa: F401  (registers AutoConfig)
from .modeling import ICDSelectorForCausalLM  # noqa: F401  (registers AutoModelForCausalLM)
from .modeling import ICDSelectorModel  # noqa: F401
from .inference import pick_demonstrations  # noqa: F401
from .tokenization import build_selector_tokenizer, parse_selection, selector_prompt  # noqa: F401
from .vocabulary import SelectorVocabulary  # noqa: F401

__all__ = [
    "ICDSelectorConfig",
    "ICDSelectorForCausalLM",
    "ICDSelectorModel",
    "SelectorVocabulary",
    "build_selector_tokenizer",
    "pick_demonstrations",
    "parse_selection",
    "selector_prompt",
]
