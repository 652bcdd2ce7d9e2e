"""The real model through the front doors: SmolLM2-135M logits for a 64-token prompt.

fp32 end to end; the compiled graph differs from eager only by the reassociation inside the
fused region kernels (norms, SwiGLU, rotary) and the flash-attention kernel (online softmax,
polynomial exp), so logits of magnitude ~10-30 agree to 1e-4 absolute, the bound the issue
sets.
"""

import torch

import compiler
from compiler.backend import CompilerBackend
from compiler.ir import op_counts
from compiler.passes.fusion.region import FusedRegion


def test_torch_compile_backend_matches_eager_on_smollm2(smollm2):
    model, inputs = smollm2.model(), smollm2.example_inputs()
    backend = CompilerBackend({"target": "host"})
    # Dynamo remembers, per attribute source, the floats it traced in this process: after the
    # tiny Llamas of other tests (rms_norm eps 1e-6), SmolLM2's eps 1e-5 on layers 0-1 and the
    # final norm made those five eps graph inputs, which fuse_rms_norm cannot fuse (see
    # test_norms_fuse_when_dynamo_makes_eps_a_graph_input): 56 of 61. Start from fresh state.
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(**inputs, use_cache=False).logits
        got = torch.compile(model, backend=backend)(**inputs, use_cache=False).logits
    torch._dynamo.reset()
    assert (got - expected).abs().max().item() <= 1e-4
    result = backend.results[-1]
    assert op_counts(result.ir)["compiler.causal_attention.default"] == 30
    # Every norm is a region (30 layers x 2 + the final norm), most with the residual add
    # before it, and the 30 attention sites share one flash-attention kernel.
    labels = [m.label for m in result.ir.modules() if isinstance(m, FusedRegion)]
    assert sum(label.endswith("rms_norm") for label in labels) == 61
    assert labels.count("swiglu") == 30
    names = [k.name for k in result.codegen.kernels]
    assert sum("attention" in name for name in names) == 1, names
    assert not [f for f in result.codegen.fallbacks if "attention" in f or "norm" in f]


def test_compile_api_matches_eager_on_smollm2(smollm2):
    model, inputs = smollm2.model(), smollm2.example_inputs()
    compiled = compiler.compile(model, inputs, target="host")
    with torch.no_grad():
        expected = model(**inputs, use_cache=False).logits
    assert (compiled(**inputs).logits - expected).abs().max().item() <= 1e-4
