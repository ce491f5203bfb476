"""The architecture of a model as a table: one row per stage (the modules of ``feature_info``) and per top-level
part around them (stem, downsample layers, norm, head), in the order the forward pass runs them, with the block
types, output shape, parameters and FLOPs (``count_flops``: one multiply-add = 1 FLOP) of each.

A model built on the meta device is summarised in a fraction of a second whatever its size (``mambazoo summary``
does that); the output shapes and FLOPs come from one forward pass.
"""
from dataclasses import dataclass
from itertools import groupby
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from .flops import count_flops

__all__ = ['SummaryRow', 'ModelSummary', 'summarize', 'format_summary']

_CONTAINERS = (nn.ModuleList, nn.Sequential)


@dataclass
class SummaryRow:
    name: str
    block_type: str
    output_shape: Optional[Tuple[int, ...]]
    params: int
    flops: int
    is_stage: bool = False


@dataclass
class ModelSummary:
    model: str
    input_shape: Tuple[int, ...]
    rows: List[SummaryRow]
    total_params: int
    total_flops: int
    output_shape: Optional[Tuple[int, ...]]


def _block_name(module: nn.Module) -> str:
    mixer = getattr(module, 'mixer', None)
    name = type(module).__name__
    return f'{name}({type(mixer).__name__})' if isinstance(mixer, nn.Module) else name


def _describe(module: nn.Module) -> str:
    """'3x GatedCNNBlock', '4x Block(MambaVisionMixer), 4x Block(Attention) + Downsample', or the class name."""
    downsample = getattr(module, 'downsample', None)
    if isinstance(module, _CONTAINERS):
        container = module
    elif isinstance(getattr(module, 'blocks', None), _CONTAINERS):
        container = module.blocks
    else:
        candidates = [m for m in module.children() if isinstance(m, _CONTAINERS) and len(m) and m is not downsample]
        container = max(candidates, key=len) if candidates else None
    if container is None or not len(container):
        return _block_name(module)
    runs = [f'{len(list(group))}x {name}' for name, group in groupby(_block_name(m) for m in container)]
    text = ', '.join(runs)
    if isinstance(downsample, nn.Module) and not isinstance(downsample, nn.Identity):
        text += ' + downsample'
    return text


def _row_modules(model: nn.Module) -> List[Tuple[str, bool]]:
    """(name, is_stage) of the rows: the stage modules, and the top-level children that hold no stage (those
    children that are ModuleLists are split into their elements, e.g. VMamba's layers)."""
    stages = [info['module'] for info in getattr(model, 'feature_info', []) if isinstance(info, dict)
              and info.get('module')]
    rows = [(name, True) for name in stages]
    for name, child in model.named_children():
        if any(s == name or s.startswith(name + '.') for s in stages):
            continue
        if not any(True for _ in child.parameters()):
            continue  # dropout, identity: no parameters, no FLOPs
        if isinstance(child, nn.ModuleList) and len(child):
            rows += [(f'{name}.{sub}', False) for sub, _ in child.named_children()]
        else:
            rows.append((name, False))
    return rows


def _shape(output: Any) -> Optional[Tuple[int, ...]]:
    if isinstance(output, Tensor):
        return tuple(output.shape)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return tuple(output[0].shape)
    return None


def summarize(model: nn.Module, input_size: Sequence[int] = (3, 224, 224), name: Optional[str] = None
              ) -> ModelSummary:
    """One forward pass of a (B=1) random input recording each row's output shape, parameters and FLOPs."""
    rows = _row_modules(model)
    modules = dict(model.named_modules())
    # A part the model never calls as a whole (e.g. a head whose children forward_head calls one by one) is
    # measured through its children.
    children = {name: [f'{name}.{sub}' for sub, _ in modules[name].named_children()] for name, _ in rows}
    tracked = [n for n, _ in rows] + [c for cs in children.values() for c in cs]
    shapes: Dict[str, Optional[Tuple[int, ...]]] = {}
    order: Dict[str, int] = {}
    handles = []
    for module_name in dict.fromkeys(tracked):
        def hook(module, args, output, module_name=module_name):
            order.setdefault(module_name, len(order))
            shapes[module_name] = _shape(output)
        handles.append(modules[module_name].register_forward_hook(hook))
    final: Dict[str, Any] = {}
    handles.append(model.register_forward_hook(lambda m, a, out: final.setdefault('shape', _shape(out))))
    try:
        count = count_flops(model, input_size=input_size, modules=list(dict.fromkeys(tracked)))
    finally:
        for h in handles:
            h.remove()

    def first_call(name: str) -> int:
        calls = [order[n] for n in [name] + children[name] if n in order]
        return min(calls) if calls else len(tracked)

    table = []
    for row_name, is_stage in sorted(rows, key=lambda r: first_call(r[0])):
        module = modules[row_name]
        flops, shape = count.by_module.get(row_name, 0), shapes.get(row_name)
        if row_name not in order:
            ran = sorted((c for c in children[row_name] if c in order), key=order.get)
            flops = sum(count.by_module.get(c, 0) for c in ran)
            shape = shapes[ran[-1]] if ran else None
        table.append(SummaryRow(
            name=row_name, block_type=_describe(module) if is_stage else type(module).__name__,
            output_shape=shape, params=sum(p.numel() for p in module.parameters()), flops=flops,
            is_stage=is_stage))
    return ModelSummary(model=name or type(model).__name__, input_shape=(1, *input_size), rows=table,
                        total_params=sum(p.numel() for p in model.parameters()), total_flops=count.total,
                        output_shape=final.get('shape'))


def format_summary(summary: ModelSummary) -> str:
    """A markdown table, with a total row (FLOPs not in any row: ops of the model's own forward, e.g. pooling)."""
    head = ['module', 'stage', 'blocks', 'output shape', 'params', 'GFLOPs']
    lines = [f'{summary.model}, input {"x".join(map(str, summary.input_shape))}',
             '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    stage_index = 0
    for row in summary.rows:
        stage = ''
        if row.is_stage:
            stage = str(stage_index)
            stage_index += 1
        shape = 'x'.join(map(str, row.output_shape)) if row.output_shape else '-'
        lines.append(f'| {row.name} | {stage} | {row.block_type} | {shape} | {row.params:,} | '
                     f'{row.flops / 1e9:.3f} |')
    rest = summary.total_flops - sum(r.flops for r in summary.rows)
    if round(rest / 1e9, 3):
        lines.append(f'| (other) | | | | | {rest / 1e9:.3f} |')
    out_shape = 'x'.join(map(str, summary.output_shape)) if summary.output_shape else '-'
    lines.append(f'| **total** | | | {out_shape} | {summary.total_params:,} | {summary.total_flops / 1e9:.3f} |')
    return '\n'.join(lines)
