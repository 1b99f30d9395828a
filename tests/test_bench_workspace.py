"""The workspace bench (`python -m bench.workspace`) on a tiny workspace: its figures
are there and positive, and every restore it timed gave the workspace back byte for
byte (it compares a hash of each path before and after; that hash must see what a
restore can get wrong)."""

from __future__ import annotations

import json
import math

from bench import workspace as bench


def test_the_bench_measures_every_mechanism_and_checks_each_restore(tmp_path, capsys):
    out = tmp_path / "figures.json"
    assert bench.main(["--files", "200", "--repeat", "2", "--json", str(out)]) == 0
    (size,) = json.loads(out.read_text())["sizes"]
    assert size["files"] == 200 and size["mib"] > 0
    assert set(size["mechanisms"]) == {"genvisor", "cp -a", "git stash"}
    for name, m in size["mechanisms"].items():
        assert m["samples"] == 2 or name == "cp -a"  # a copy may take one sample: when it takes seconds
        assert m["restores_checked"] == m["samples"] and len(m["restore"]) == m["samples"]
        for key in ("cold", "warm_p50", "warm_p90", "after_change_p50", "restore_p50"):
            assert m[key] > 0, key
        assert (m["after_restore_p50"] is None) if name == "cp -a" else m["after_restore_p50"] > 0
    for name in ("genvisor", "cp -a"):
        m = size["mechanisms"][name]
        assert m["restores_exact"] == m["samples"], m["not_restored"]
    # The stash's one miss here: the directories the deletions emptied (git keeps none).
    stash = size["mechanisms"]["git stash"]
    assert all(p.endswith("(dir → absent)") for p in stash["not_restored"])
    for peer in ("cp -a", "git stash"):
        ratios = {key: r for key, r in size["ratios"][peer].items() if (peer, key) != ("cp -a", "after_restore_p50")}
        assert all(r is not None and math.isfinite(r) and r > 0 for r in ratios.values()), ratios
    printed = capsys.readouterr().out
    assert "genvisor ÷ cp -a" in printed and "not measured (no 10,000-file run)" in printed


def test_the_tree_hash_sees_bytes_modes_links_and_directories(tmp_path):
    root = tmp_path / "ws"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"x")
    (root / "l").symlink_to("d/f")
    alterations = [
        ("d/f (file → file)", lambda: (root / "d" / "f").write_bytes(b"y")),
        ("d/f (file → file)", lambda: (root / "d" / "f").chmod(0o755)),
        ("l (link → link)", lambda: ((root / "l").unlink(), (root / "l").symlink_to("d"))),
        ("empty (absent → dir)", lambda: (root / "empty").mkdir()),
    ]
    for expected, alter in alterations:
        before = bench.tree_manifest(root)
        alter()
        assert bench.differences(before, bench.tree_manifest(root)) == [expected]
    before = bench.tree_manifest(root)
    (root / ".git").mkdir()  # the stash's repository: not the workspace's content
    assert bench.differences(before, bench.tree_manifest(root)) == []
