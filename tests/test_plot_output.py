"""`--plot FILE` of the sweeps is an output like any other: an existing file is replaced only with
--overwrite, the check runs before the sweep starts, and the write is atomic."""
import os

import pytest

from accel.artifact import ArtifactError, write_file
from accel.cli import main


@pytest.mark.parametrize("cmd", [["eval", "ds-sweep"], ["eval", "prune-sweep"]], ids=["ds-sweep", "prune-sweep"])
def test_existing_plot_file_is_refused_before_the_sweep(cmd, tmp_path, capsys, monkeypatch):
    import accel.models

    png = tmp_path / "mine.png"
    png.write_bytes(b"the user's figure")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the --plot output was checked")

    monkeypatch.setattr(accel.models, "load", no_load)
    rc = main(cmd + ["--plot", str(png)])
    err = capsys.readouterr().err
    assert rc == 2 and "mine.png exists; pass --overwrite" in err
    assert png.read_bytes() == b"the user's figure"


def test_write_file_is_atomic_and_needs_overwrite(tmp_path):
    out = tmp_path / "fig.png"
    write_file(out, lambda tmp: open(tmp, "wb").write(b"one"))
    assert out.read_bytes() == b"one"
    with pytest.raises(ArtifactError, match="pass --overwrite"):
        write_file(out, lambda tmp: open(tmp, "wb").write(b"two"))

    def fails(tmp):
        open(tmp, "wb").write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_file(out, fails, overwrite=True)
    assert out.read_bytes() == b"one" and sorted(os.listdir(tmp_path)) == ["fig.png"]
    write_file(out, lambda tmp: open(tmp, "wb").write(b"two"), overwrite=True)
    assert out.read_bytes() == b"two" and sorted(os.listdir(tmp_path)) == ["fig.png"]
    (tmp_path / "d").mkdir()
    with pytest.raises(ArtifactError, match="not a regular file"):
        write_file(tmp_path / "d", lambda tmp: None, overwrite=True)


def test_save_figure_writes_a_png_and_closes_it(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from accel.artifact import save_figure

    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    out = save_figure(fig, tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not plt.fignum_exists(fig.number)
    fig2, _ = plt.subplots()
    with pytest.raises(ArtifactError, match="pass --overwrite"):
        save_figure(fig2, out)
    assert not plt.fignum_exists(fig2.number) and sorted(os.listdir(tmp_path)) == ["p.png"]
