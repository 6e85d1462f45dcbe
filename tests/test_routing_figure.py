"""TensorBoard routing figures: labelled tasks x experts shares, like the papers' routing figures."""

import torch

from medir_monai.handlers.tensorboard import routing_figure


def test_routing_figure_labels_tasks_experts_and_shares():
    share = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4], [1.0, 0.0, 0.0, 0.0]])
    fig = routing_figure(share, ["mri_sr", "ct_denoise", "pet_synthesis"], "SRM 2")
    main_ax, bar_ax = fig.axes  # the grid and its colour bar
    cells = [t.get_text() for t in main_ax.texts]
    assert cells == ["50%", "50%", "0%", "0%", "10%", "20%", "30%", "40%", "100%", "0%", "0%", "0%"]
    assert [t.get_text() for t in main_ax.get_yticklabels()] == ["mri_sr", "ct_denoise", "pet_synthesis"]
    assert [t.get_text() for t in main_ax.get_xticklabels()] == [f"expert {e}" for e in range(4)]
    assert "SRM 2" in main_ax.get_title() and bar_ax.get_ylabel() == "share of tokens"
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    width, height = canvas.get_width_height()
    assert width > 300 and height > 150  # a readable figure, not a 3 x 4 pixel grid
