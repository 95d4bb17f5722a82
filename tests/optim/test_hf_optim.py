"""Every hesskit optimizer, with only its required arguments, trains Hugging Face models built from
small configs with their default SDPA attention and dict inputs: a GPT-2-style LM and a BERT
classifier. Closures return the loss (or (loss, ModelOutput) for the optimizers that need outputs)."""

from __future__ import annotations

import pytest
import torch
from hf_zoo import bert, gpt2, token_batches
from torch import nn

import hesskit as hk

OPTIMIZERS = {
    "AdaHessian": lambda model: hk.optim.AdaHessian(model.parameters()),
    "Sophia-H": lambda model: hk.optim.Sophia(model.parameters()),
    "Sophia-G": lambda model: hk.optim.Sophia(model.parameters(), estimator="gnb"),
    "K-FAC": lambda model: hk.optim.KFAC(model),
    "MKOR": lambda model: hk.optim.MKOR(model),
    "M-FAC": lambda model: hk.optim.MFAC(model.parameters()),
    "Newton-CG (GGN)": lambda model: hk.optim.NewtonCG(model.parameters()),
    "Newton-CG (Hessian)": lambda model: hk.optim.NewtonCG(model.parameters(), curvature="hessian"),
}
STEPS = 25


def _problem(task: str):
    torch.manual_seed(0)
    if task == "gpt2":
        model = gpt2(hidden=16, layers=2)
        criterion = hk.SequenceCrossEntropy(shift=True)
        (inputs, targets), = token_batches(sizes=(8,), seed=1)
    else:
        model = bert(hidden=16, layers=2)
        criterion = nn.CrossEntropyLoss()
        (inputs, targets), = token_batches(sizes=(8,), seed=1, classes=3)
    assert model.config._attn_implementation == "sdpa"
    return model.eval(), criterion, inputs, targets


@pytest.mark.filterwarnings("ignore:.*fall back")  # K-FAC/MKOR name the layers they do not precondition
@pytest.mark.parametrize("task", ["gpt2", "bert"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_lowers_the_loss_on_a_transformer(name, task):
    model, criterion, inputs, targets = _problem(task)
    opt = OPTIMIZERS[name](model)

    def closure():
        opt.zero_grad()
        out = model(**inputs)
        loss = criterion(out.logits, targets)
        return (loss, out) if opt.needs_outputs else loss

    with torch.no_grad():
        start = criterion(model(**inputs).logits, targets).item()
    for _ in range(STEPS):
        opt.step(closure)
    with torch.no_grad():
        end = criterion(model(**inputs).logits, targets).item()
    assert end < 0.97 * start, (start, end)  # Sophia (lr 6e-4, the GPT-2 setting) and M-FAC move slowest


def test_backward_inside_the_closure_gets_a_clear_error():
    model, criterion, inputs, targets = _problem("bert")
    opt = hk.optim.AdaHessian(model.parameters())

    def closure():
        opt.zero_grad()
        loss = criterion(model(**inputs).logits, targets)
        loss.backward()  # the torch.optim habit
        return loss

    with pytest.raises(RuntimeError, match="without calling backward"):
        opt.step(closure)
