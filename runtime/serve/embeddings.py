"""``POST /v1/embeddings``: one vector per input text, from the served encoder.

The vectors are ``EmbeddingsPipeline.encode``'s, as ``ember embed`` computes them (pooled and normalized as the
model's sentence-transformers configuration says). ``encoding_format: base64`` sends each vector as the base64 of
its little-endian float32 bytes, which OpenAI's Python client asks for by default and decodes itself.
"""
from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Request

from .errors import APIError
from .request_schemas import EmbeddingRequest
from .response_schemas import EmbeddingData, EmbeddingResponse, EmbeddingUsage

router = APIRouter()


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.astype(np.float32).tolist()


@router.post("/v1/embeddings")
async def create_embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    model = request.app.state.models.embeddings_model(body.model)
    try:
        vectors, tokens = await model.embed(body.texts)
    except ValueError as error:  # an input longer than the model's maximum
        raise APIError(400, str(error), param="input", code="context_length_exceeded") from None
    dimension = int(vectors.shape[1])
    if body.dimensions is not None and body.dimensions != dimension:
        raise APIError(400, f"dimensions: this model's embeddings have {dimension} dimensions, got "
                       f"{body.dimensions}", param="dimensions", code="invalid_value")
    request.app.state.metrics.embedded_tokens.labels(model.name).inc(tokens)
    data = [EmbeddingData(index=i, embedding=_encode(v, body.encoding_format)) for i, v in enumerate(vectors)]
    return EmbeddingResponse(data=data, model=model.name, usage=EmbeddingUsage(prompt_tokens=tokens,
                                                                               total_tokens=tokens))
