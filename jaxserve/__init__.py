"""jaxserve: an OpenAI-compatible LLM inference server on JAX/XLA."""
from jaxserve.outputs import CompletionOutput, Logprob, RequestOutput
from jaxserve.sampling_params import GuidedDecodingParams, RequestOutputKind, SamplingParams

__version__ = "0.1.0"


def __getattr__(name):  # LLM pulls in JAX and the models: import it only when asked for
    if name == "LLM":
        from jaxserve.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "GuidedDecodingParams", "RequestOutputKind", "RequestOutput",
           "CompletionOutput", "Logprob", "__version__"]
