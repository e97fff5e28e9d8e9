"""Perplexity bookkeeping: chunking, exclusion of calibration tokens, scoring."""

import math

import pytest
import torch

from lutlm.perplexity import chunk_starts, score_chunks


def test_chunks_are_consecutive_and_skip_excluded_range():
    assert chunk_starts(1000, 100, None, None) == list(range(0, 1000, 100))
    # Tokens 250..420 were seen by the quantizer: chunks 200, 300 and 400 overlap them.
    assert chunk_starts(1000, 100, None, (250, 420)) == [0, 100, 500, 600, 700, 800, 900]
    assert chunk_starts(1000, 100, 2, (0, 100)) == [100, 200]


def test_uniform_model_has_perplexity_of_vocab_size():
    vocab = 50
    result = score_chunks(lambda chunk: torch.zeros(len(chunk), vocab), list(range(40)) * 10, ctx=32,
                          progress=False)
    assert result.chunks == 400 // 32
    assert result.tokens_scored == result.chunks * (32 // 2 - 1)  # second half, less the last position
    assert math.isclose(result.perplexity, vocab, rel_tol=1e-6)  # float32 log-softmax


def test_perfect_model_has_perplexity_one_and_bos_replaces_first_token():
    tokens = [3, 1, 4, 1, 5, 9, 2, 6] * 4
    seen = []

    def oracle(chunk):
        seen.append(chunk[0])
        logits = torch.full((len(chunk), 10), -1e4)
        logits[torch.arange(len(chunk) - 1), torch.tensor(chunk[1:])] = 0
        return logits

    result = score_chunks(oracle, tokens, ctx=8, bos_id=7, progress=False)
    assert math.isclose(result.perplexity, 1.0, rel_tol=1e-6)
    assert seen == [7] * 4


def test_bad_context_and_short_text_are_refused():
    with pytest.raises(ValueError, match="even number"):
        score_chunks(lambda c: torch.zeros(len(c), 2), [0] * 10, ctx=3, progress=False)
    with pytest.raises(ValueError, match="too few for one chunk of 512"):
        score_chunks(lambda c: torch.zeros(len(c), 2), [0] * 10, ctx=512, progress=False)
