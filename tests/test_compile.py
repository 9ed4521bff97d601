"""Interventions under torch.compile: no graph breaks, compiled logits equal eager ones.

``torch._dynamo.explain`` counts the graph breaks of one forward of a tiny OLMoE (3 MoE layers)
under each kind of intervention, on the CPU with the plain-torch routing path and with the Triton
kernel (the ``moetrace::route`` custom op, run by Triton's interpreter on the CPU); a
``torch.compile(model, fullgraph=True)`` forward (which fails on any break) must give the eager
logits. ``torch.library.opcheck`` checks the custom op's schema, fake and autograd registrations.
The inductor compile is slow on a shared CPU and runs in the slow suite; the fast suite compiles
with the ``aot_eager`` backend (the same Dynamo capture and AOT autograd, no code generation).
"""

from __future__ import annotations

import os

import pytest
import torch

from moetrace.intervene import ablate, intervene, steer
from moetrace.targets import Targets
from moetrace.kernels.routing import _op_args, _route_op, route_options
from tiny_models import VOCAB, tiny_model

needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="the Triton kernel on the CPU needs TRITON_INTERPRET=1 (tests/conftest.py sets it)",
)

# name -> the context manager's arguments (layers of the tiny 3-layer model: 0, 1, 2)
CASES = {
    "empty": lambda m, b: intervene(m, Targets(), backend=b),
    "experts": lambda m, b: ablate(m, experts={0: [1, 2]}, backend=b),
    "paths": lambda m, b: ablate(m, paths={1: [((1,), 2)], 2: [((1, 2), 3), ((4,), 5)]}, backend=b),
    "pairs": lambda m, b: ablate(m, pairs={2: [(1, 2), (3, 4)]}, backend=b),
    "zero": lambda m, b: ablate(m, experts={0: [1]}, paths={2: [((0, 3), 3)]}, pairs={1: [(0, 1)]}, mode="zero",
                                backend=b),
    "steer": lambda m, b: steer(m, 1, 3, logit=2.0, scale=0.5, backend=b),
    "everything": lambda m, b: intervene(m, Targets(
        experts={0: [1, 2]}, paths={1: [((3,), 4)], 2: [((0, 5), 6)]}, pairs={2: [(1, 2)]},
        boosts={1: {3: {"logit": 1.5, "scale": 0.5}}}), backend=b),
}
FAST = {"torch": ("everything", "zero"), "triton": ("everything",)}  # the rest: slow suite


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_model("olmoe")


def token_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def graph_breaks(model, context) -> tuple[int, list[str]]:
    torch._dynamo.reset()
    with torch.no_grad(), context:
        explained = torch._dynamo.explain(model)(input_ids=token_ids())
    return explained.graph_break_count, [str(reason.reason)[:200] for reason in explained.break_reasons]


def _params():
    out = []
    for backend in ("torch", "triton"):
        for case in CASES:
            marks = [] if case in FAST[backend] else [pytest.mark.slow]
            if backend == "triton":
                marks.append(needs_interpreter)
            out.append(pytest.param(backend, case, marks=marks, id=f"{backend}-{case}"))
    return out


@pytest.mark.parametrize("backend,case", _params())
def test_no_graph_breaks(model, backend, case):
    count, reasons = graph_breaks(model, CASES[case](model, backend))
    assert count == 0, reasons


def test_fullgraph_compile_equals_eager(model):
    ids = token_ids()
    torch._dynamo.reset()
    with torch.no_grad(), CASES["everything"](model, "torch"):
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids).logits
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    assert not torch.allclose(plain, eager, atol=1e-4)  # the intervention did change the output


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_fullgraph_inductor_equals_eager(model, backend):
    ids = token_ids()
    torch._dynamo.reset()
    with torch.no_grad(), ablate(model, experts={0: [1, 2]}, paths={2: [((1, 2), 3)]}, backend=backend):
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, fullgraph=True)(input_ids=ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_training_step_gradients_equal_eager(model):
    """A compiled forward + backward through the custom op's autograd gives the eager gradients."""
    ids = token_ids()
    router = model.model.layers[0].mlp.gate
    grads = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model.zero_grad()
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        with ablate(model, experts={0: [1, 2]}, backend="triton"):
            run(input_ids=ids, labels=ids).loss.backward()
        grads.append(router.weight.grad.clone())
    model.zero_grad()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


@needs_interpreter
@pytest.mark.parametrize("kw", [
    dict(),
    dict(renormalize=True, expert_mask=torch.tensor([True, False] * 4), pair_table=torch.eye(8, dtype=torch.bool)),
    dict(scoring="sigmoid", bias=torch.linspace(-0.1, 0.1, 8), n_group=2, topk_group=1, mask_mode="zero",
         path_table=torch.eye(8, dtype=torch.bool).roll(1, 1), prev_top1=torch.tensor([-1, 0, 3, 7, 2])),
])
def test_custom_op_registrations(kw):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of moetrace::route."""
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    o = route_options(logits, 2, **kw)
    torch.library.opcheck(_route_op, (logits, *_op_args(o)))
