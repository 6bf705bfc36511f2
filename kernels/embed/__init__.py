from .naive import embed_tokens_ref
from .interface import embed_tokens_fn

__all__ = ["embed_tokens_fn", "embed_tokens_ref"]
