"""`fedblock export`, `fedblock eval` and the terminal progress line."""

import io

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedblock.common.cli import main
from fedblock.common.progress import Progress


def test_export_of_a_chosen_round_and_eval_of_it(federation, data_file, tmp_path, capsys):
    fed = federation(rounds=3, local_steps=2, lr=1e-3, keep_checkpoints=5, eval_data=str(data_file), eval_max_examples=8)
    fed.add_worker(fed.worker_config("w", data_file))
    summary = fed.run()
    state = fed.coordinator.store.root

    assert main(["export", "--state-dir", str(state), "--out", str(tmp_path / "r1"), "--round", "1"]) == 0
    assert main(["export", "--state-dir", str(state), "--out", str(tmp_path / "last")]) == 0
    last = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "last").named_parameters())
    final = dict(AutoModelForCausalLM.from_pretrained(summary["export_path"]).named_parameters())
    r1 = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "r1").named_parameters())
    assert all(torch.equal(last[n], final[n]) for n in final)
    assert any(not torch.equal(r1[n], final[n]) for n in final)
    assert main(["export", "--state-dir", str(state), "--out", str(tmp_path / "x"), "--round", "9"]) == 2
    assert "no checkpoint for round 9" in capsys.readouterr().err

    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "last"), "--data", str(data_file), "--max-examples", "8",
                 "--accuracy-examples", "2", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    loss = float(out.split("loss ")[1].split()[0])
    assert loss == pytest.approx(summary["eval_loss_final"], rel=1e-4)  # the coordinator's own evaluation
    assert "exact-match answers" in out and "/2 " in out


def test_progress_line_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    p = Progress(tty, interval=0)
    p.show("round 1: step 1/3")
    p.show("round 1: step 2/3")
    p.clear()
    assert tty.getvalue().count("\r") == 4 and "step 2/3" in tty.getvalue()
    plain = io.StringIO()
    Progress(plain, interval=0).show("x")
    assert plain.getvalue() == ""
