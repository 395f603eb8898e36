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

Full passes instead (:func:`cut_correct` returns None) wherever the graph may not be the model: torch.fx cannot trace
it; a layer is not exactly one call in the graph (called twice, never, or nested in another ablated layer); tracing
changed the model (a lazily set attribute, a constant added: the model is restored); a hook sits where the graphs
would skip it (on the model itself, on a module the tracer went through, or a global one); an edit of a layer before
the cut; and, as a last check on every call, the first batch's outputs differ in any bit from a full pass with the
same edits (a branch fixed at trace time, views or strides that copies do not keep).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import fx, nn

from ..hooks import _first_tensor, _replace_first, trace
from ..models import channels_last, to_layout

__all__ = ["LayerGraph", "cut_correct", "hooks_skipped"]


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
        if hooks_skipped(model, layers):  # they would also run on torch.fx proxies while it traces
            return None
        was_training = model.training
        model.eval()  # traced as it runs here: Python branches on self.training are fixed at trace time
        before = _state(model)
        try:
            with torch.no_grad():  # likewise torch.is_grad_enabled()
                graph = _LeafTracer(layers).trace(model)
        except Exception:  # noqa: BLE001 - control flow on values, untraceable ops...: full passes instead
            graph = None
        finally:
            changed = not _same(_state(model), before)
            if changed:
                _restore(before)
            model.train(was_training)
        if graph is None or changed:
            return None
        nodes, where = list(graph.nodes), {}
        for i, n in enumerate(nodes):
            if n.op == "call_module" and n.target in layers:
                if n.target in where:
                    return None  # called twice: one cut cannot hold both calls
                where[n.target] = i
        if len(where) != len(layers):
            return None
        return cls(model, nodes, where)

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
        head.output(tuple(prefix[n] for n in cut))  # no dead-code elimination: in-place ops have no users
        tail = fx.Graph()
        env = {n: tail.placeholder(f"cut_{i}") for i, n in enumerate(cut)}

        def value(a: fx.Node) -> fx.Node:
            if a not in env:  # a get_attr before the cut
                env[a] = tail.node_copy(a, value)
            return env[a]
        for n in nodes[k + 1:]:
            env[n] = tail.node_copy(n, value)
        return fx.GraphModule(self.model, head), fx.GraphModule(self.model, tail), cut.index(nodes[k])


def hooks_skipped(model: nn.Module, layers: Iterable[str]) -> bool:
    """Whether a forward hook would not run in graphs traced with ``layers`` as leaves: one on the model itself, on
    a module the tracer goes through (only modules called as a whole, or inside one, keep theirs), or a global one.
    Asked before tracing and on every use (hooks come and go)."""
    from torch.nn.modules import module as nn_module
    if any(getattr(nn_module, g, None) for g in ("_global_forward_hooks", "_global_forward_pre_hooks")):
        return True
    tracer, modules = _LeafTracer(layers), dict(model.named_modules())
    for name, m in modules.items():
        if m._forward_hooks or m._forward_pre_hooks:
            parts = name.split(".") if name else []
            if not any(tracer.is_leaf_module(modules[p], p) for p in (".".join(parts[:i])
                                                                    for i in range(1, len(parts) + 1))):
                return True
    return False


def _state(model: nn.Module) -> list:
    """What tracing must not change: every module's attributes, parameters, buffers and children (by identity)."""
    return [(m, dict(vars(m)), dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in model.modules()]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x[0] is y[0] and all(_same_dict(p, q) for p, q in zip(x[1:], y[1:]))
                                    for x, y in zip(a, b))


def _same_dict(p: dict, q: dict) -> bool:
    return p.keys() == q.keys() and all(p[k] is q[k] for k in p)


def _restore(before: list) -> None:
    """Undo what tracing set on the modules (e.g. a lazily built attribute left as a torch.fx Proxy)."""
    for m, attrs, params, buffers, children in before:
        vars(m).clear()
        vars(m).update(attrs)
        m._parameters.clear(), m._parameters.update(params)
        m._buffers.clear(), m._buffers.update(buffers)
        m._modules.clear(), m._modules.update(children)


def _fresh(v):
    """A copy of a cut value (a tensor, or a tuple, named tuple, list or dict of them); anything else as it is."""
    if torch.is_tensor(v):
        return v.clone()
    if isinstance(v, tuple) and hasattr(v, "_fields"):
        return type(v)(*(_fresh(t) for t in v))
    if isinstance(v, (tuple, list)):
        return type(v)(_fresh(t) for t in v)
    return {k: _fresh(t) for k, t in v.items()} if isinstance(v, dict) else v


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
    parts = graph.split(layer) if not hooks_skipped(model, graph.where) else None
    if parts is None:
        return None
    head, tail, at = parts
    cols = torch.as_tensor(list(class_index), dtype=torch.long, device=device) if class_index is not None else None
    right: list[list[torch.Tensor]] = [[] for _ in edit_sets]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), channels_last(model) as layout:
            for b, (x, y) in enumerate(val):
                x = to_layout(x.to(device, non_blocking=True), layout)
                values = head(x)
                y = y.reshape(-1).cpu()
                for j, edits in enumerate(edit_sets):
                    inputs = [_fresh(v) for v in values]  # the suffix may write into its inputs
                    inputs[at] = _replace_first(inputs[at], edits[layer](_first_tensor(inputs[at])))
                    with trace(model, edit={l: e for l, e in edits.items() if l != layer}):
                        out = tail(*inputs)
                    if b == 0 and j == 0:  # the last check: the graphs give what the model gives, to the bit
                        with trace(model, edit=dict(edits)):
                            full = model(x)
                        if not (torch.is_tensor(out) and torch.is_tensor(full) and torch.equal(out, full)):
                            return None
                    if cols is not None:
                        out = out.index_select(1, cols)
                    right[j].append(reduce(out, y) if reduce else out.argmax(1).cpu() == y)
    finally:
        model.train(was_training)
    if not right[0] or sum(len(r) for r in right[0]) == 0:
        raise ValueError("the validation loader yielded no images")
    return [torch.cat(r) for r in right]
