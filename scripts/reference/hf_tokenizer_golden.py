"""Writes the golden files of kiln-data's Hugging Face tokenizer test: a small byte-level BPE tokenizer trained
with the Python `tokenizers` library on generated text, documents to tokenise, and the ids the library gives them.

    python3 -m pip install tokenizers==0.23.2
    python3 scripts/reference/hf_tokenizer_golden.py [--out crates/kiln-data/tests/golden/hf_tokenizer]

Everything is generated from fixed seeds; no corpus is read. The tokenizer is GPT-2's kind (ByteLevel
pre-tokenizer, no prefix space, `<|endoftext|>` after the merges) plus a post-processor that puts
`<|endoftext|>` in front of every text, which `kiln prepare` must leave out as Python does with
add_special_tokens=False.
"""

import argparse
import json
import os
import random
import struct

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

END_OF_TEXT = "<|endoftext|>"
MERGES = 400

WORDS = (
    "the of and to in is was for on that with as by it at from he she they we you his her their this which "
    "would could should there where when what because through between after before under over again never "
    "river mountain city window letter morning evening garden silver winter summer question answer number "
    "Paris London Tokyo Monday September Anna Bertrand Chen O'Neill McDonald "
    "don't it's we'll they've I'm she'd you're SHE'S IT'LL "
    "café naïve Straße façade smörgåsbord jalapeño Ελληνικά русский язык 日本語 中文 한국어 مرحبا שלום "
    "e\u0301te\u0301 co\u00f6perate \U0001F642 \u2603 \u00bd \u00b2 \u2460"
).split(" ")
PUNCTUATION = [",", ".", ";", ":", "!", "?", "...", " -", " --", " (", ")", '"', "'", " $", "%", " #", "@", "&"]
# The whitespace that block cuts must respect: blank lines, trailing spaces, carriage returns, tabs, indentation
# and non-ASCII spaces (no-break, ideographic).
SEPARATORS = [" "] * 40 + ["\n", "\n\n", " \n", "\r\n", "\t", "  ", "\n    ", "\u00a0", "\u3000", "\n\n\n", "  \n"]
SEPARATORS += [" \n\n", "\r\n\r\n", " \n \n"] * 2


def word_salad(rng, n_words):
    """Text of about n_words words: sentences of words, numbers and punctuation, in lines and paragraphs."""
    out = []
    for _ in range(n_words):
        r = rng.random()
        if r < 0.08:
            out.append(str(rng.randrange(0, 10 ** rng.randrange(1, 7))))
        elif r < 0.16:
            out.append(rng.choice(WORDS) + rng.choice(PUNCTUATION))
        else:
            word = rng.choice(WORDS)
            out.append(word.capitalize() if rng.random() < 0.1 else word)
        out.append(rng.choice(SEPARATORS))
    return "".join(out)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    default_out = os.path.join(here, "..", "..", "crates", "kiln-data", "tests", "golden", "hf_tokenizer")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=default_out)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + MERGES,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Pieces of a few hundred words, newlines and all, so that the merges include runs of whitespace ("\n\n",
    # " \n", "\r\n"; the pre-tokenizer leaves them whole only before more whitespace or at the end): a tokenizer
    # without them would not notice a block cut in the wrong place.
    rng = random.Random(1)
    tokenizer.train_from_iterator([word_salad(rng, 300) for _ in range(150)], trainer=trainer)
    tokenizer.add_special_tokens([END_OF_TEXT])
    end_of_text = tokenizer.token_to_id(END_OF_TEXT)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{END_OF_TEXT} $A", special_tokens=[(END_OF_TEXT, end_of_text)]
    )
    tokenizer_path = os.path.join(args.out, "tokenizer.json")
    tokenizer.save(tokenizer_path)
    # The ids come from the file as saved, which is what kiln reads.
    tokenizer = Tokenizer.from_file(tokenizer_path)

    # The documents, in the order the test names them: a text file of many 1 KiB blocks, a short one that also
    # writes the end-of-text token literally (the library reads it as the special token), and three JSON Lines
    # documents, one of them empty.
    rng = random.Random(2)
    long_text = word_salad(rng, 3_500)
    short_text = word_salad(rng, 300) + f" {END_OF_TEXT} " + word_salad(rng, 100)
    lines = [word_salad(rng, 40), "", word_salad(rng, 60)]
    documents = [long_text, short_text] + lines
    with open(os.path.join(args.out, "long.txt"), "w", encoding="utf-8", newline="") as f:
        f.write(long_text)
    with open(os.path.join(args.out, "short.txt"), "w", encoding="utf-8", newline="") as f:
        f.write(short_text)
    with open(os.path.join(args.out, "documents.jsonl"), "w", encoding="utf-8", newline="\n") as f:
        for text in lines:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")

    # kiln's convention: every document follows an end-of-text token.
    ids = []
    for text in documents:
        ids.append(end_of_text)
        ids.extend(tokenizer.encode(text, add_special_tokens=False).ids)
    with open(os.path.join(args.out, "ids.u32"), "wb") as f:
        f.write(struct.pack(f"<{len(ids)}I", *ids))
    print(
        f"tokenizers {tokenizers.__version__}: vocabulary {tokenizer.get_vocab_size(with_added_tokens=True)}, "
        f"end-of-text {end_of_text}, {len(long_text.encode())} + {len(short_text.encode())} bytes of text, "
        f"{len(ids)} ids"
    )


if __name__ == "__main__":
    main()
