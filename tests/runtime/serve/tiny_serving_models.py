"""The two tiny models the server's tests serve: a word-level Llama with a chat template (text generation) and a
word-level BERT (embeddings). Random weights, no download; each is a real Hugging Face folder that ember compiles."""
from __future__ import annotations

import json
import re
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[3] / "tools"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")
#: Long enough that a stream can be left (or a server stopped) while it is still generating.
LLAMA_MAX_POSITIONS = 1024


def text() -> str:
    return (TOOLS / "bench_text.txt").read_text(encoding="utf-8")


def make_chat_llama(directory: Path) -> Path:
    """A random 2-layer Llama over the benchmark text's words, its tokenizer with a chat template."""
    from ...reference.tiny_models import make_word_llama

    model, _ = make_word_llama(directory, text(), extra_words=("hello", "user", "assistant", "system", ":"),
                               max_position_embeddings=LLAMA_MAX_POSITIONS)
    model.save_pretrained(directory)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_file.write_text(json.dumps(config))
    return directory


def make_word_bert(directory: Path) -> Path:
    """A random 2-layer BERT (mean pooling, the default without sentence-transformers files) with a WordPiece
    vocabulary of the benchmark text's most common words."""
    from collections import Counter

    from transformers import BertTokenizerFast

    from ...graphs.bert.tiny_encoders import VOCAB, make_model

    make_model("bert", directory)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [w for w, _ in Counter(re.findall(r"[a-z]+", text().lower())).most_common(VOCAB - len(specials))]
    (directory / "vocab.txt").write_text("\n".join(specials + words) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(directory / "vocab.txt")).save_pretrained(directory)
    return directory
