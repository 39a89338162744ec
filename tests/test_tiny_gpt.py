"""The book's tiny GPT (bench/tiny_gpt.py): PyTorch with fastembed against the scalar reference."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
tiny_gpt = pytest.importorskip("bench.tiny_gpt")


def test_check_reference_agrees_for_two_steps():
    """The command line check on two 2-word sentences (the scalar model takes about a second a step)."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.tiny_gpt", "--check-reference", "--steps", "2", "--check-words", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "agreement: OK" in result.stdout
    assert "PyTorch float64, fastembed float32" in result.stdout


def test_corpus_and_tokenizer():
    sentences = tiny_gpt.make_corpus(size=300)
    assert sentences == tiny_gpt.make_corpus(size=300)  # deterministic
    assert len(set(sentences)) == 300
    assert all(2 <= len(s.split()) <= tiny_gpt.BLOCK_SIZE - 2 for s in sentences)
    tok = tiny_gpt.Tokenizer(sentences)
    assert tok.bos == tok.vocab_size - 1 == len(tok.words)  # BOS is the last id, as in the book
    ids = tok.encode(sentences[0])
    assert ids[0] == ids[-1] == tok.bos and tok.decode(ids) == sentences[0]


def test_parameter_count_is_the_books_formula():
    weights = tiny_gpt.init_weights(597)  # the book's vocabulary
    assert sum(w.size for w in weights.values()) == 63_296
    assert all(w.dtype.name == "float32" for w in weights.values())


def test_scalar_and_torch_models_compute_the_same_loss():
    import torch

    sentences = tiny_gpt.make_corpus(size=200)
    tok = tiny_gpt.Tokenizer(sentences)
    weights = tiny_gpt.init_weights(tok.vocab_size, seed=1)
    tokens = tok.encode(next(s for s in sentences if len(s.split()) == 2))
    expected = tiny_gpt.ScalarGPT(weights).loss(tokens).data
    for first_layer, dtype, tol in (("torch", torch.float64, 1e-12), ("fastembed", torch.float64, 1e-6),
                                    ("fastembed", torch.float32, 1e-5)):
        model = tiny_gpt.torch_model(weights, first_layer, dtype)
        ids, targets = tiny_gpt.as_tensors(tokens)
        loss = model.loss(ids, targets).item()
        assert abs(loss - expected) <= tol * abs(expected), (first_layer, dtype, loss, expected)
