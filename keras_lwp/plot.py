"""plot_strategy: the layer graph drawn with each layer colored by its configuration and the edges
where a relayout happens marked in red. PNG/SVG/PDF need matplotlib (`pip install keras_lwp[plot]`);
a .dot path writes Graphviz DOT with no extra dependency."""

import networkx as nx

from keras_lwp.strategy import Strategy, _colors


def plot_strategy(model_or_strategy, path, title=None):
    """Draw a Strategy (or the one a parallelized model runs) to `path`; returns `path`.

    Args:
        model_or_strategy: a keras_lwp.Strategy (from `keras_lwp.search`), or a model returned by
            `keras_lwp.parallelize`.
        path: where to write; the suffix picks the format: .dot (Graphviz text, no dependency) or
            any format matplotlib writes (.png, .svg, .pdf).
        title: the figure's title; default the strategy's name, mesh and predicted step time.
    """
    strategy = _strategy(model_or_strategy)
    if str(path).endswith(".dot"):
        with open(path, "w") as f:
            f.write(strategy.to_dot())
        return path
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as error:
        raise ImportError(f"plot_strategy writes {path} with matplotlib, which is not installed. Install it "
                          "with `pip install keras_lwp[plot]`, or write Graphviz DOT with a .dot path.") from error

    graph = nx.DiGraph()
    graph.add_nodes_from(strategy)
    graph.add_edges_from((e.src, e.dst) for e in strategy.edges)
    positions, columns, rows = _layered_positions(graph)
    colors = _colors(strategy)
    figure, axes = plt.subplots(figsize=(max(7.0, 2.4 * columns), max(4.0, 0.8 * rows + 2.0)))
    for edge in strategy.edges:
        (x0, y0), (x1, y1) = positions[edge.src], positions[edge.dst]
        style = dict(color="#d62728", lw=2.5) if edge.relayout else dict(color="#888888", lw=1.0)
        axes.annotate("", xy=(x1, y1), xytext=(x0, y0), zorder=1,
                      arrowprops=dict(arrowstyle="-|>", shrinkA=14, shrinkB=14, **style))
    for name, (x, y) in positions.items():
        report = strategy.layers.get(name)
        label = f"{name}\n{report.class_name if report else ''} {strategy[name]}"
        axes.text(x, y, label, ha="center", va="center", fontsize=7, zorder=2,
                  bbox=dict(boxstyle="round,pad=0.3", facecolor=colors[str(strategy[name])], edgecolor="#555555"))
    legend = [Patch(facecolor=color, edgecolor="#555555", label=config) for config, color in colors.items()
              if any(str(c) == config for c in strategy.values())]
    legend.append(Patch(facecolor="#d62728", label="edge with a relayout"))
    axes.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(legend)),
                fontsize=8, title="configuration")
    xs = [x for x, _ in positions.values()]
    ys = [y for _, y in positions.values()]
    axes.set_xlim(min(xs) - 0.9, max(xs) + 0.9)
    axes.set_ylim(min(ys) - 0.6, max(ys) + 0.6)
    cost = f"\npredicted {strategy.cost.total * 1e3:.1f} ms/step" if strategy.cost else ""
    axes.set_title(title or f"Strategy '{strategy.name}' on {strategy.mesh}{cost}", fontsize=10)
    axes.set_axis_off()
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def _strategy(model_or_strategy):
    if isinstance(model_or_strategy, Strategy):
        return model_or_strategy
    from keras_lwp.runtime import strategy_of

    return strategy_of(model_or_strategy)


def _layered_positions(graph, max_rows=12):
    """{node: (x, y)}, the number of columns and of rows. Nodes are layered by longest path from the
    inputs, top-down, each layer's nodes side by side; past `max_rows` layers the drawing wraps into
    a new column to the right, so a long chain like VGG-16 stays readable."""
    if nx.is_directed_acyclic_graph(graph):
        generations = list(nx.topological_generations(graph))
    else:
        generations = [[node] for node in graph]
    width = max((len(nodes) for nodes in generations), default=1)
    positions = {}
    for depth, nodes in enumerate(generations):
        column, row = divmod(depth, max_rows)
        for index, node in enumerate(nodes):
            positions[node] = (column * (width + 0.8) + index - (len(nodes) - 1) / 2, -row)
    columns = 1 + (len(generations) - 1) // max_rows if generations else 1
    return positions, columns * width, min(len(generations), max_rows)
