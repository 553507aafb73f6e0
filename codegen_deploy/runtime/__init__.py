"""Generation on every backend: open a Session, then generate() or stream().

from codegen_deploy.runtime import open_session, generate, stream
from codegen_deploy.model.tokenizer import load_tokenizer

session = open_session("onnxruntime", "exports/codegen-350M-mono")
tokenizer = load_tokenizer("exports/codegen-350M-mono")
print(generate(session, tokenizer, "def fib(n):", max_new_tokens=64).text)
"""

from .backends import available_backends, open_session
from .generate import GenerationConfig, GenerationResult, generate, stream
from .sampling import SamplingConfig
from .session import Session

__all__ = [
    "GenerationConfig",
    "GenerationResult",
    "SamplingConfig",
    "Session",
    "available_backends",
    "generate",
    "open_session",
    "stream",
]
