"""tfbackend: will a Hugging Face model serve correctly through vLLM's Transformers backend?"""

__version__ = "0.1.0"
