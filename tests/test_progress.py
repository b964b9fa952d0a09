"""Progress bars of the long data steps: drawn on a terminal, silent otherwise (logs, CI)."""
import io
import sys

import numpy as np

from data import download, prepare_proxy


class Terminal(io.StringIO):
    def isatty(self):
        return True


class FakePool:
    """Pool.imap without processes: each batch of texts becomes (count, tokens)."""

    def imap(self, fn, batches):
        return ((len(b), np.ones(len(b), np.uint16)) for b in batches)


def tokenize_output(monkeypatch, stream):
    monkeypatch.setattr(sys, "stderr", stream)
    tokens, n_docs = prepare_proxy.tokenize(FakePool(), [f"doc {i}" for i in range(600)], "tokenizing val", 600)
    assert n_docs == 600 and len(tokens) == 600
    return stream.getvalue()


def test_prepare_proxy_shows_a_document_bar_on_a_terminal_only(monkeypatch):
    shown = tokenize_output(monkeypatch, Terminal())
    assert "tokenizing val" in shown and "600/600" in shown
    assert tokenize_output(monkeypatch, io.StringIO()) == ""


def test_download_bars_follow_the_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not download.progress_bar(total=10).disable
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert download.progress_bar(total=10).disable
