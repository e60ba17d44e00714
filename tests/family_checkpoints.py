"""Tiny random span checkpoints of the families SpanRT exports, each with a real tokenizer made here.

Nothing is downloaded. Each family gets a model built from its transformers config (hidden 32,
2-3 layers) and a tokenizer of the kind its real checkpoints ship, trained with the `tokenizers`
library on SQuAD train contexts plus a few paragraphs in other scripts (the Unigram ones are
trained once and shipped in tests/data/tokenizers/: their trainer is not deterministic):

- SentencePiece-style Unigram with Metaspace (XLM-RoBERTa, CamemBERT, ALBERT, DeBERTa-v3), with
  the normalizers and pair templates transformers' converters (convert_slow_tokenizer.py, 4.57)
  give those families. The one difference: the real files start with sentencepiece's
  ``Precompiled`` nmt_nfkc charsmap, a binary table only sentencepiece can produce; here NFKC plus
  "every whitespace character becomes a space" stands in for it (what nmt_nfkc does to text like
  this, and length-changing like it, so offsets still have to be mapped back).
- byte-level BPE with [CLS]/[SEP] (ModernBERT, whose tokenizer is OLMo's BPE);
- WordPiece with MPNet's <s>/</s> layout, built by transformers' own MPNet converter from a vocab.txt
  (the project's shipped uncased BERT vocabulary plus MPNet's special tokens).

The span heads are scaled up so best spans are decided by clear margins, as in a trained model.
"""

from __future__ import annotations

import gzip
import json
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

from engine.default_model import CHECKPOINT_DIR
from export.samples import SHIPPED_SAMPLE

FAMILIES = ("xlm-roberta", "camembert", "albert", "mpnet", "deberta-v2", "modernbert")
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)

# Paragraphs in other scripts and with awkward spacing: in the tokenizers' training text (so their
# characters are in the vocabularies) and, as contexts, in the edge-case questions below.
EDGE_CASES: tuple[tuple[str, str, str], ...] = (
    # (what it tests, question, context)
    ("leading and trailing spaces", "Where was Marie Curie born?", "   Marie Curie was born in Warsaw in 1867.   "),
    ("repeated spaces, tabs and newlines", "Where was she born?",
     "Marie  Curie\twas   born\n\nin  Warsaw,\t\tPoland,\r\nin 1867.\n"),
    ("the ▁ word marker in the text", "What marks a word start?",
     "The marker ▁ starts a word in SentencePiece; ▁Warsaw and War▁saw are written with it ▁▁ twice."),
    ("accents (precomposed)", "Où est né Frédéric Chopin ?",
     "Frédéric Chopin est né à Żelazowa Wola, près de Varsovie, en 1810. Ça été écrit en français."),
    ("accents (combining marks)", "Where was Chopin born?",
     "Fre\u0301de\u0301ric Chopin was born in Z\u0307elazowa Wola near Warsaw; Dvor\u030ca\u0301k was Czech."),
    ("CJK without spaces", "居里出生在哪里？", "玛丽·居里出生于华沙。她后来在巴黎工作。東京は日本の首都です。서울은 한국의 수도입니다."),
    ("emoji", "When does the party start?",
     "The party 🎉 starts at 8 pm 🕗 in the garden 🌳🌷 with the whole family 👨‍👩‍👧 and 🇵🇱 flags."),
    ("right-to-left text (Arabic)", "أين ولدت ماري كوري؟", "ولدت ماري كوري في وارسو عام 1867، ثم انتقلت إلى باريس."),
    ("right-to-left text (Hebrew, mixed)", "Where was she born?", "מארי קירי נולדה בוורשה (Warsaw) בשנת 1867 ועברה לפריז."),
    ("non-breaking and zero-width spaces", "Who was born in Warsaw?",
     "Marie\u00a0Curie\u200bwas born in\u2003Warsaw\u3000in 1867 —\u202fthe “Paris” years came later."),
    ("Cyrillic and Greek", "Где родилась Мария?", "Мария Склодовская родилась в Варшаве. Η Μαρία γεννήθηκε στη Βαρσοβία."),
    ("digits, punctuation, quotes", "How much did it cost?",
     "It cost $1,234.56 (about €1.100,00) on 2026-12-03 — \"a bargain\", they said… [sic]"),
)


def _squad_contexts(n: int) -> list[str]:
    with gzip.open(SHIPPED_SAMPLE, "rt", encoding="utf-8") as f:
        return [json.loads(line)["context"] for _, line in zip(range(n), f)]


@lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """The tokenizers' training text: SQuAD train contexts, then the edge-case paragraphs."""
    return (*_squad_contexts(200), *(c for _, _, c in EDGE_CASES), *(q for _, q, _ in EDGE_CASES))


def _nmt_nfkc_stand_in() -> list[Any]:
    from tokenizers import Regex, normalizers

    return [normalizers.NFKC(), normalizers.Replace(Regex(r"\s"), " ")]


def _unigram(style: str, specials: list[str], vocab_size: int = 1500) -> Any:
    """A Unigram + Metaspace tokenizer trained on ``corpus()`` with ``style``'s normalizer/template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    unk = next(s for s in specials if "unk" in s.lower())
    if style in ("xlm-roberta", "camembert"):  # SpmConverter's default normalizer
        norm = [*_nmt_nfkc_stand_in(), normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "▁")]
    elif style == "albert":  # AlbertConverter: quotes, accents stripped, lowercase (albert-base-v2)
        norm = [normalizers.Replace("``", '"'), normalizers.Replace("''", '"'), normalizers.NFKD(), normalizers.StripAccents(),
                normalizers.Lowercase(), *_nmt_nfkc_stand_in(), normalizers.Replace(Regex(" {2,}"), " ")]
    elif style == "deberta-v2":  # DebertaV2Converter (deberta-v3: cased, split_by_punct off)
        norm = [normalizers.Strip(), *_nmt_nfkc_stand_in(), normalizers.Replace(Regex(" {2,}"), " ")]
    else:
        raise ValueError(style)
    tok.normalizer = normalizers.Sequence(norm)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=unk, show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    if style in ("xlm-roberta", "camembert"):
        cls, sep = "<s>", "</s>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} {sep} $B {sep}",
            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    else:
        cls, sep = "[CLS]", "[SEP]"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    return tok


UNIGRAM_SPECIALS = {
    "xlm-roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    "camembert": ["<s>NOTUSED", "<pad>", "</s>NOTUSED", "<unk>", "<s>", "</s>", "<mask>"],  # camembert-base's first ids
    "albert": ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"],
    "deberta-v2": ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"],
}
# The Unigram trainer is not deterministic (its piece scores vary from run to run, and with
# them the models' answers), so the tokenizers it made are shipped: tests/data/tokenizers/.
SHIPPED_TOKENIZERS = Path(__file__).resolve().parent / "data" / "tokenizers"


def unigram_tokenizer(family: str) -> Any:
    """``family``'s shipped Unigram tokenizer (made by ``_unigram``; ``python tests/family_checkpoints.py``
    writes them again)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(SHIPPED_TOKENIZERS / f"{family}.json"))


def _byte_level_bpe(specials: list[str], vocab_size: int = 1500) -> Any:
    """A byte-level BPE (GPT-2/OLMo style, offsets not trimmed) with a [CLS]/[SEP] pair template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return tok


def save_tokenizer(family: str, dst: Path) -> Any:
    """Write ``family``'s tokenizer files (as save_pretrained does) to ``dst``; returns the tokenizer."""
    import transformers as tf

    if family == "mpnet":
        bert_vocab = (CHECKPOINT_DIR / "vocab.txt").read_text(encoding="utf-8").splitlines()
        vocab = dst / "mpnet-vocab.txt"
        vocab.write_text("\n".join(["<s>", "<pad>", "</s>", "<unk>", *bert_vocab, "<mask>"]) + "\n", encoding="utf-8")
        tok = tf.MPNetTokenizerFast(vocab_file=str(vocab))  # transformers' own converter builds the fast tokenizer
        vocab.unlink()
    elif family in ("xlm-roberta", "camembert"):
        cls = tf.XLMRobertaTokenizerFast if family == "xlm-roberta" else tf.CamembertTokenizerFast
        tok = cls(tokenizer_object=unigram_tokenizer(family), bos_token="<s>", eos_token="</s>", sep_token="</s>",
                  cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    elif family in ("albert", "deberta-v2"):
        specials = UNIGRAM_SPECIALS[family]
        cls = tf.AlbertTokenizerFast if family == "albert" else tf.DebertaV2TokenizerFast
        pad, unk = specials[0], next(s for s in specials if "unk" in s.lower())
        tok = cls(tokenizer_object=unigram_tokenizer(family), cls_token="[CLS]", sep_token="[SEP]", pad_token=pad,
                  unk_token=unk, mask_token="[MASK]", bos_token="[CLS]", eos_token="[SEP]")
    elif family == "modernbert":
        specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]", "<|padding|>"]
        tok = tf.PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe(specials), cls_token="[CLS]", sep_token="[SEP]",
                                         pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]",
                                         model_input_names=["input_ids", "attention_mask"])
    else:
        raise ValueError(f"no test tokenizer for {family!r}")
    tok.save_pretrained(str(dst))
    return tok


def make_checkpoint(root: Path, family: str, *, seed: int = 0, hidden_act: str | None = None) -> Path:
    """Save a tiny random ``family`` span model plus its tokenizer files to ``root`` (``hidden_act``:
    another activation than the family's default)."""
    import torch

    root.mkdir(parents=True)
    tok = save_tokenizer(family, root)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # transformers' DeBERTa module decorates helpers with torch.jit.script, deprecated in torch 2.13
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.", category=DeprecationWarning)
        model = _model(family, tok, {"hidden_act": hidden_act} if hidden_act else {})
    with torch.no_grad():
        (model.classifier if family == "modernbert" else model.qa_outputs).weight.mul_(40.0)
    model.save_pretrained(str(root))
    return root


def native_checkpoint(root: Path, family: str, *, seed: int = 0) -> Path:
    """A tiny checkpoint the native encoder computes, of any family its weight mapping covers
    (engine.native_weights.FAMILIES): tests/test_export.py's for BERT, DistilBERT, RoBERTa and
    ELECTRA, this module's for the others (ALBERT with the exact GELU here; test_families exports
    the gelu_new one real ALBERT checkpoints have)."""
    if family in FAMILIES:
        return make_checkpoint(root, family, seed=seed, hidden_act="gelu" if family == "albert" else None)
    from test_export import make_checkpoint as make_wordpiece_or_bpe_checkpoint

    return make_wordpiece_or_bpe_checkpoint(root, family, seed=seed)


def _model(family: str, tok: Any, extra: dict[str, Any]) -> Any:
    import transformers as tf

    size = len(tok)
    ids = {k: tok.convert_tokens_to_ids(getattr(tok, f"{k}_token")) for k in ("pad", "cls", "sep")}
    special = dict(pad_token_id=ids["pad"], bos_token_id=ids["cls"], eos_token_id=ids["sep"], **extra)
    if family in ("xlm-roberta", "camembert"):
        cfg_cls = tf.XLMRobertaConfig if family == "xlm-roberta" else tf.CamembertConfig
        model_cls = tf.XLMRobertaForQuestionAnswering if family == "xlm-roberta" else tf.CamembertForQuestionAnswering
        model = model_cls(cfg_cls(vocab_size=size, max_position_embeddings=514, type_vocab_size=1, **special, **SMALL))
    elif family == "albert":  # one shared layer run twice, a 16 -> 32 embedding projection, gelu_new
        model = tf.AlbertForQuestionAnswering(tf.AlbertConfig(vocab_size=size, embedding_size=16, max_position_embeddings=512,
                                                              **special, **SMALL))
    elif family == "mpnet":
        model = tf.MPNetForQuestionAnswering(tf.MPNetConfig(vocab_size=size, max_position_embeddings=514,
                                                            relative_attention_num_buckets=32, **special, **SMALL))
    elif family == "deberta-v2":  # DeBERTa-v3's settings: no absolute positions, no token types, c2p|p2c
        model = tf.DebertaV2ForQuestionAnswering(tf.DebertaV2Config(
            vocab_size=size, max_position_embeddings=512, type_vocab_size=0, relative_attention=True, position_buckets=64,
            norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False,
            max_relative_positions=-1, **special, **SMALL))
    elif family == "modernbert":  # 3 layers: global, local (window 16), global
        small = {**SMALL, "num_hidden_layers": 3}
        model = tf.ModernBertForQuestionAnswering(tf.ModernBertConfig(
            vocab_size=size, max_position_embeddings=512, local_attention=16, global_attn_every_n_layers=2,
            cls_token_id=ids["cls"], sep_token_id=ids["sep"], **special, **small))
    else:
        raise ValueError(f"no tiny checkpoint for {family!r}")
    return model


if __name__ == "__main__":  # write the shipped Unigram tokenizers again
    SHIPPED_TOKENIZERS.mkdir(parents=True, exist_ok=True)
    for name, specials in UNIGRAM_SPECIALS.items():
        _unigram(name, specials).save(str(SHIPPED_TOKENIZERS / f"{name}.json"), pretty=False)
