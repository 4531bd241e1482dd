"""Build the local tokenizer inference-perf needs, offline, with the `tokenizers` and `transformers` packages
of the inference-perf venv (run by that venv's Python: `python tokenizer.py OUT_DIR`).

inference-perf's shared-prefix generator draws random token ids from a tokenizer, decodes them to text and
counts tokens with the same tokenizer; the simulated fleet counts a prompt as ceil(characters / 4) tokens
(`epp_lab.sim.engine.prompt_token_count`). A word-level tokenizer whose every word has three letters
decodes N tokens to N words joined by spaces: 4N - 1 characters, which the simulator counts as N tokens.
So "system_prompt_len: 3000" is 3,000 tokens on both sides, and the prompt_tokens the fleet reports match
inference-perf's own count. The vocabulary is made here (all 3-letter lowercase words, in a fixed order):
nothing is downloaded, no binary is committed. The simulator's output words (" the", " of", ...) are split
on whitespace, one token per word, as the fleet counts them.
"""

from __future__ import annotations

import itertools
import json
import string
import sys
from pathlib import Path

VOCAB_WORDS = 8000
UNK = "[UNK]"


def build(out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["".join(w) for w in itertools.product(string.ascii_lowercase, repeat=3)][:VOCAB_WORDS]
    vocab = {UNK: 0, **{w: i + 1 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Decode N word tokens to N words joined by single spaces (4N - 1 characters).
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=core, unk_token=UNK, model_max_length=1_000_000)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    _check(out)
    return out


def _check(out: Path) -> None:
    """The property the benchmark relies on: decode(n ids) has 4n - 1 characters and n tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    ids = list(range(1, 3001, 7))
    text = tok.decode(ids, skip_special_tokens=True)
    n = len(ids)
    if len(text) != 4 * n - 1 or len(tok(text).input_ids) != n:
        raise SystemExit(
            f"tokenizer check failed: {n} ids -> {len(text)} chars, {len(tok(text).input_ids)} tokens"
        )
    if len(tok(" the of and", add_special_tokens=False).input_ids) != 3:
        raise SystemExit("tokenizer check failed: the simulator's output words are not one token each")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tokenizer.py OUT_DIR")
    path = build(Path(sys.argv[1]))
    print(json.dumps({"tokenizer": str(path), "vocab": VOCAB_WORDS + 1}))
