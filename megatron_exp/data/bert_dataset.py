"""BERT training samples: sentence pairs with sentence-order labels, and whole-word masked language modelling.

Each sample is a run of whole sentences from one document, about seq_len - 3 tokens long, cut at a random
sentence into segment A and segment B. Half the time the two are swapped, and the sentence-order label says so
(1 = swapped). The pair becomes `[CLS] A [SEP] B [SEP]`, padded to seq_len, with token types 0 for `[CLS] A [SEP]`
and 1 for `B [SEP]`. When too long (before any swap), A loses tokens from its start and B from its end, so the
boundary the sentence-order task is about stays in view.

Masking follows BERT: 15% of the sequence's tokens (never [CLS]/[SEP]/[PAD]) are chosen, whole words at a time
(a WordPiece starting with ## belongs to the word before it); each chosen token becomes [MASK] 80% of the time, a
random token 10%, and stays itself 10%. The model predicts the original tokens at the chosen positions.

Every random choice comes from a generator seeded with (seed, position), so position i of the run (the same
positions as GPT samples: see gpt_dataset) is the same sample, split, swap and mask on every rank and after a
restart, and a sample seen again in a later epoch gets fresh masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer

from megatron_exp.config import ConfigError
from megatron_exp.data import tokenizer as tokenizers
from megatron_exp.data.gpt_dataset import SampleOrder

MASK_FRACTION = 0.15
REPLACE_WITH_MASK, KEEP = 0.8, 0.1  # the rest (10%) becomes a random token


@dataclass(frozen=True)
class Vocabulary:
    """What masking needs to know about a WordPiece vocabulary."""

    pad: int
    cls: int
    sep: int
    mask: int
    continues_word: np.ndarray  # bool per id: the piece starts with ##
    replacements: np.ndarray  # ids a masked token may be replaced with: every non-special token

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> Vocabulary:
        ids = {t: tokenizer.token_to_id(t) for t in tokenizers.BERT_SPECIAL_TOKENS}
        if None in ids.values():
            raise ConfigError(
                "model.arch=bert needs a WordPiece tokenizer with [CLS], [SEP], [MASK] and [PAD]: set "
                "data/tokenizer=wordpiece_8k (or bert_uncased)"
            )
        size = tokenizer.get_vocab_size()
        pieces = [tokenizer.id_to_token(i) or "" for i in range(size)]
        special = np.isin(np.arange(size), list(ids.values()))
        return cls(
            pad=ids[tokenizers.PAD],
            cls=ids[tokenizers.CLS],
            sep=ids[tokenizers.SEP],
            mask=ids[tokenizers.MASK],
            continues_word=np.array([p.startswith(tokenizers.CONTINUATION) for p in pieces]),
            replacements=np.flatnonzero(~special),
        )


def sentence_runs(sentence_lengths: np.ndarray, document_sentences: np.ndarray, target: int) -> np.ndarray:
    """[n, 2] (first sentence, end sentence) of each sample: consecutive sentences of one document, closed once
    they hold `target` tokens or the document ends; a run needs two sentences (one for each segment)."""
    runs = []
    first_of_document = 0
    for count in document_sentences.tolist():
        end_of_document = first_of_document + count
        start, tokens = first_of_document, 0
        for sentence in range(first_of_document, end_of_document):
            tokens += int(sentence_lengths[sentence])
            if (tokens >= target or sentence == end_of_document - 1) and sentence + 1 - start >= 2:
                runs.append((start, sentence + 1))
                start, tokens = sentence + 1, 0
        first_of_document = end_of_document
    return np.array(runs, dtype=np.int64).reshape(-1, 2)


def _fit(a: int, b: int, room: int) -> tuple[int, int]:
    """Lengths of A and B after trimming the longer one, token by token (B first on a tie), until both fit in
    `room`: the longer comes down to the shorter, then the two shrink in turn."""
    excess = a + b - room
    if excess <= 0:
        return a, b
    if a > b:
        cut = min(excess, a - b)
        a, excess = a - cut, excess - cut
    else:
        cut = min(excess, b - a)
        b, excess = b - cut, excess - cut
    return a - excess // 2, b - (excess + 1) // 2


def mask_whole_words(
    ids: np.ndarray, candidates: np.ndarray, vocab: Vocabulary, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Choose ~15% of len(ids) tokens among `candidates` (positions of non-special tokens), whole words at a time;
    return (the ids after replacement, the chosen positions)."""
    budget = max(1, round(MASK_FRACTION * len(ids)))
    starts_word = ~vocab.continues_word[ids[candidates]]
    starts_word[1:] |= np.diff(candidates) != 1  # a piece after a special token starts a word
    starts_word[0] = True
    words = np.split(candidates, np.flatnonzero(starts_word)[1:])
    chosen: list[np.ndarray] = []
    size = 0
    for w in rng.permutation(len(words)):
        if size + len(words[w]) <= budget:
            chosen.append(words[w])
            size += len(words[w])
        if size == budget:
            break
    positions = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    masked = ids.copy()
    draw = rng.random(len(positions))
    to_mask = draw < REPLACE_WITH_MASK
    to_random = draw >= REPLACE_WITH_MASK + KEEP
    masked[positions[to_mask]] = vocab.mask
    masked[positions[to_random]] = rng.choice(vocab.replacements, size=int(to_random.sum()))
    return masked, positions


class BERTSamples:
    """The samples of one split; `micro_batch(positions)` gives the model's inputs and the loss's targets."""

    def __init__(
        self,
        tokens: np.ndarray,
        sentence_lengths: np.ndarray,
        document_sentences: np.ndarray,
        vocab: Vocabulary,
        seq_len: int,
        seed: int,
        shuffle: bool = True,
        split: str = "train",
    ):
        self.tokens, self.vocab, self.seq_len, self.seed = tokens, vocab, seq_len, seed
        self.sentence_starts = np.concatenate([[0], np.cumsum(sentence_lengths)])
        self.runs = sentence_runs(sentence_lengths, document_sentences, target=seq_len - 3)
        if len(self.runs) == 0:
            raise ConfigError(
                f"the {split} split has no document with two sentences, so no BERT sentence pair can be made: "
                "use a corpus of multi-sentence documents (data.sample_by=paragraph or document)"
            )
        self.order = SampleOrder(len(self.runs), seed, shuffle)

    def __len__(self) -> int:
        return len(self.runs)

    def sample(self, position: int) -> dict[str, np.ndarray | int]:
        """The sample at `position`: ids, token types, chosen positions with their original ids, SOP label."""
        rng = np.random.default_rng([self.seed, position])
        first, end = self.runs[self.order.sample_index(position)]
        cut = first + int(rng.integers(1, end - first))
        start, middle, stop = self.sentence_starts[[first, cut, end]]
        len_a, len_b = _fit(middle - start, stop - middle, self.seq_len - 3)
        a, b = np.asarray(self.tokens[middle - len_a : middle]), np.asarray(self.tokens[middle : middle + len_b])
        swapped = bool(rng.random() < 0.5)
        if swapped:
            a, b, len_a, len_b = b, a, len_b, len_a
        v = self.vocab
        ids = np.concatenate([[v.cls], a, [v.sep], b, [v.sep]]).astype(np.int64)
        types = np.concatenate([np.zeros(len_a + 2), np.ones(len_b + 1)]).astype(np.int64)
        candidates = np.concatenate([np.arange(1, len_a + 1), np.arange(len_a + 2, len_a + 2 + len_b)])
        masked, positions = mask_whole_words(ids, candidates, v, rng)
        return {"ids": masked, "types": types, "positions": positions, "targets": ids[positions], "sop": swapped}

    def micro_batch(self, positions: range) -> tuple[dict, dict]:
        n, seq = len(positions), self.seq_len
        tokens = torch.full((n, seq), self.vocab.pad, dtype=torch.long)
        token_types = torch.zeros(n, seq, dtype=torch.long)
        padding_mask = torch.zeros(n, seq, dtype=torch.bool)
        mlm_targets = torch.zeros(n, seq, dtype=torch.long)
        mlm_mask = torch.zeros(n, seq, dtype=torch.bool)
        sop_labels = torch.zeros(n, dtype=torch.long)
        for row, position in enumerate(positions):
            s = self.sample(position)
            length = len(s["ids"])
            tokens[row, :length] = torch.from_numpy(s["ids"])
            token_types[row, :length] = torch.from_numpy(s["types"])
            padding_mask[row, :length] = True
            mlm_targets[row, s["positions"]] = torch.from_numpy(s["targets"])
            mlm_mask[row, s["positions"]] = True
            sop_labels[row] = int(s["sop"])
        inputs = {"tokens": tokens, "token_types": token_types, "padding_mask": padding_mask}
        return inputs, {"mlm_targets": mlm_targets, "mlm_mask": mlm_mask, "sop_labels": sop_labels}
