"""Compiler ops: custom torch.library ops that passes insert and backends lower."""

from compiler.ops.registry import Kernel, LoweringRequest, CompilerOp, compiler_op, compiler_ops, op_for_target
from compiler.ops.attention_scores import attention_key_scores
from compiler.ops.block_sparse_attention import block_sparse_attention
from compiler.ops.causal_attention import causal_attention
from compiler.ops.rms_norm import rms_norm
from compiler.ops.sparse_layout import sparse_attention_layout
from compiler.ops.kv_quant import quantized_kv_attention
from compiler.ops.shift_add import shiftadd_linear

__all__ = [
    "attention_key_scores",
    "CompilerOp",
    "block_sparse_attention",
    "causal_attention",
    "Kernel",
    "LoweringRequest",
    "compiler_op",
    "compiler_ops",
    "op_for_target",
    "quantized_kv_attention",
    "rms_norm",
    "shiftadd_linear",
    "sparse_attention_layout",
]
