"""natgrad.torch.Shampoo: a torch optimizer whose Shampoo state lives on
natgrad-server. Every trainable parameter is one ``shampoo`` block (its
gradient viewed as [shape[0], prod(rest)]; 1-D parameters get the diagonal
preconditioner)::

    opt = natgrad.torch.Shampoo(model, target="localhost:50051", lr=1e-2)
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

A numeric ``lr`` in ``param_groups`` is sent with every step (so torch LR
schedulers work); a natgrad.schedules message is evaluated on the server.
The other hyperparameters are fixed at construction (blocks.shampoo).
"""
from natgrad import blocks as _blocks
from natgrad.torch_dense import DenseBlockOptimizer

__all__ = ["Shampoo"]


class Shampoo(DenseBlockOptimizer):
    """Shampoo through natgrad-server for a torch.nn.Module.

    model: the module (every parameter with requires_grad becomes a block).
    target / client: where the server is (or a natgrad.Client).
    lr, weight_decay: numbers or natgrad.schedules; the other keywords are
    blocks.shampoo's (beta1, beta2, eps, bias_correction,
    precondition_frequency, start_preconditioning_step,
    max_preconditioner_dim, inverse_root, grafting, grafting_beta2,
    grafting_eps). state_dtype: "float32" (default) or "float64".
    shared_memory: as natgrad.torch.KFAC's (a server on this host with
    --shared_memory).
    """

    _public_name = "natgrad.torch.Shampoo"
    _display_kind = "shampoo"

    def __init__(self, model, target=None, *, client=None, token=None, tls=None, lr=1e-3,
                 weight_decay=0.0, state_dtype=None, display_name=None, shared_memory=False,
                 **shampoo_kwargs):
        def make_config(name, shape):
            return _blocks.shampoo(name, shape, lr=lr, weight_decay=weight_decay or None,
                                   **shampoo_kwargs)

        self._setup(model, target, client, token, tls, lr, weight_decay, state_dtype,
                    display_name, make_config, shared_memory)
