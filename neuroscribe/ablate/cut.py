"""Scoring many ablations from one layer on: the model up to the layer runs once per validation batch, not once per
ablation.

MILAN's ordering ablates each flagged unit alone and measures validation accuracy again: one pass over the
validation set a unit, and everything before the unit's layer is the same in all those passes. :class:`LayerGraph`
traces the model once with torch.fx, the ablated layers kept as leaf modules, and cuts it at a layer: a *prefix*
graph gives, for a batch, the layer's output and every earlier value the rest of the model still reads (the input of
a residual branch that skips the layer, say); a *suffix* graph runs the rest from those values. :func:`cut_correct`
runs the prefix once a batch and the suffix once for each edit set: the layer's own edit is applied to its output as
the forward hook of :func:`neuroscribe.hooks.trace` applies it, edits of later layers run as hooks (the graphs call
the model's own submodules), and every suffix pass gets fresh copies of the cut values (a suffix may write into its
inputs: ``ReLU(inplace=True)``). The predictions are those of full passes, bit for bit (the tests compare them).

A model that torch.fx cannot trace, a layer that is not exactly one call in the graph (called twice, never, or
nested in another ablated layer) or an edit of a layer before the cut: :func:`cut_correct` returns None and the
caller makes full passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import fx, nn

from ..hooks import _first_tensor, _replace_first, trace
from ..models import channels_last, to_layout

__all__ = ["LayerGraph", "cut_correct"]


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer with ``leaves`` (qualified module names) kept as single calls."""

    def __init__(self, leaves: Iterable[str]):
        super().__init__()
        self.leaves = frozenset(leaves)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)


class LayerGraph:
    """``model``'s graph with ``layers`` as leaf calls (:meth:`trace`), cut at any of them (:meth:`split`)."""

    def __init__(self, model: nn.Module, nodes: list[fx.Node], where: dict[str, int]):
        self.model, self.nodes, self.where = model, nodes, where
        self._splits: dict[str, tuple[fx.GraphModule, fx.GraphModule, int] | None] = {}

    @classmethod
    def trace(cls, model: nn.Module, layers: Iterable[str]) -> "LayerGraph | None":
        """The graph, or None where it cannot be cut at every one of ``layers``."""
        layers = list(dict.fromkeys(layers))
        if any(a != b and b.startswith(a + ".") for a in layers for b in layers):
            return None  # a layer inside another: the inner one's call is hidden in the outer leaf
        was_training = model.training
        model.eval()  # traced as it runs here: Python branches on self.training are fixed at trace time
        try:
            graph = _LeafTracer(layers).trace(model)
        except Exception:  # noqa: BLE001 - control flow on values, untraceable ops...: full passes instead
            return None
        finally:
            model.train(was_training)
        nodes, where = list(graph.nodes), {}
        for i, n in enumerate(nodes):
            if n.op == "call_module" and n.target in layers:
                if n.target in where:
                    return None  # called twice: one cut cannot hold both calls
                where[n.target] = i
        return cls(model, nodes, where) if len(where) == len(layers) else None

    def order(self, layer: str) -> int:
        """The layer's position in the graph (its call's index)."""
        return self.where[layer]

    def split(self, layer: str) -> tuple[fx.GraphModule, fx.GraphModule, int] | None:
        """``(prefix, suffix, at)``: ``prefix(x)`` returns the cut values (a tuple), ``suffix(*values)`` the model's
        output, ``values[at]`` is the layer's output. None when the output does not read the layer."""
        if layer not in self._splits:
            self._splits[layer] = self._split(self.where[layer])
        return self._splits[layer]

    def _split(self, k: int) -> tuple[fx.GraphModule, fx.GraphModule, int] | None:
        nodes = self.nodes
        pos = {n: i for i, n in enumerate(nodes)}
        # values computed up to the cut that the rest reads; parameters and buffers are read again after it
        cut = [n for n in nodes[:k + 1] if n.op != "get_attr" and any(pos[u] > k for u in n.users)]
        if nodes[k] not in cut:
            return None
        prefix: dict[fx.Node, fx.Node] = {}
        head = fx.Graph()
        for n in nodes[:k + 1]:
            prefix[n] = head.node_copy(n, prefix.__getitem__)
        head.output(tuple(prefix[n] for n in cut))
        tail = fx.Graph()
        env = {n: tail.placeholder(f"cut_{i}") for i, n in enumerate(cut)}

        def value(a: fx.Node) -> fx.Node:
            if a not in env:  # a get_attr before the cut
                env[a] = tail.node_copy(a, value)
            return env[a]
        for n in nodes[k + 1:]:
            env[n] = tail.node_copy(n, value)
        first = fx.GraphModule(self.model, head)
        if first.graph.eliminate_dead_code():  # what only the rest used
            first.recompile()
        return first, fx.GraphModule(self.model, tail), cut.index(nodes[k])


def _fresh(v):
    """A copy of a cut value (a tensor, or a tuple or list of them); anything else as it is."""
    if torch.is_tensor(v):
        return v.clone()
    return type(v)(_fresh(t) for t in v) if isinstance(v, (tuple, list)) else v


def cut_correct(model: nn.Module, graph: LayerGraph | None, layer: str, val: Iterable,
                edit_sets: Sequence[Mapping[str, Callable]], device: torch.device,
                class_index: Sequence[int] | None = None,
                reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                ) -> list[torch.Tensor] | None:
    """For each of ``edit_sets`` (``{layer: edit}`` as :func:`~neuroscribe.ablate.edit.ablation_edits` gives), what
    :func:`~neuroscribe.ablate.select.val_correct` returns, from one prefix pass a batch cut at ``layer``. Every edit
    set must edit ``layer``; its other layers must come after it in the graph. None: make full passes instead.
    ``reduce(outputs, labels)`` keeps something else of each batch (default: whether the top class is the label)."""
    if graph is None or layer not in graph.where or not edit_sets:
        return None
    if any(layer not in e or any(l not in graph.where or graph.order(l) <= graph.order(layer)
                                 for l in e if l != layer) for e in edit_sets):
        return None
    parts = graph.split(layer)
    if parts is None:
        return None
    head, tail, at = parts
    cols = torch.as_tensor(list(class_index), dtype=torch.long, device=device) if class_index is not None else None
    right: list[list[torch.Tensor]] = [[] for _ in edit_sets]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), channels_last(model) as layout:
            for x, y in val:
                values = head(to_layout(x.to(device, non_blocking=True), layout))
                y = y.reshape(-1).cpu()
                for j, edits in enumerate(edit_sets):
                    inputs = [_fresh(v) for v in values]  # the suffix may write into its inputs
                    inputs[at] = _replace_first(inputs[at], edits[layer](_first_tensor(inputs[at])))
                    with trace(model, edit={l: e for l, e in edits.items() if l != layer}):
                        out = tail(*inputs)
                    if cols is not None:
                        out = out.index_select(1, cols)
                    right[j].append(reduce(out, y) if reduce else out.argmax(1).cpu() == y)
    finally:
        model.train(was_training)
    if not right[0] or sum(len(r) for r in right[0]) == 0:
        raise ValueError("the validation loader yielded no images")
    return [torch.cat(r) for r in right]
