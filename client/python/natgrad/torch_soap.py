"""natgrad.torch.SOAP: a torch optimizer whose SOAP state (Vyas et al. 2024:
Adam in the eigenbasis of Shampoo's factors) lives on natgrad-server. Every
trainable parameter is one ``soap`` block (its gradient viewed as
[shape[0], prod(rest)], rank > 2 merged as the shampoo kind does; 1-D
parameters are plain Adam)::

    opt = natgrad.torch.SOAP(model, target="localhost:50051", lr=3e-3)
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

The defaults are the authors' reference (lr 3e-3, betas (0.95, 0.95),
shampoo_beta = betas[1], eps 1e-8, weight_decay 0.01, precondition_frequency
10, max_precond_dim 10000). As there, the first step only builds the
eigenbases and leaves the parameters unchanged. A numeric ``lr`` in
``param_groups`` is sent with every step (so torch LR schedulers work); a
natgrad.schedules message is evaluated on the server. The other
hyperparameters are fixed at construction (blocks.soap).
"""
from natgrad import blocks as _blocks
from natgrad.torch_dense import DenseBlockOptimizer

__all__ = ["SOAP"]


class SOAP(DenseBlockOptimizer):
    """SOAP through natgrad-server for a torch.nn.Module.

    model: the module (every parameter with requires_grad becomes a block).
    target / client: where the server is (or a natgrad.Client).
    lr, weight_decay: numbers or natgrad.schedules (weight_decay 0 turns it
    off; otherwise every step sends the parameters). betas, shampoo_beta
    (None or negative: betas[1]), eps, precondition_frequency,
    max_precond_dim, correct_bias: as the reference's keywords. refresh:
    'power_qr' (the reference: one power iteration + QR) or 'eigh'.
    state_dtype: "float32" (default) or "float64". shared_memory: as
    natgrad.torch.KFAC's (a server on this host with --shared_memory).
    """

    _public_name = "natgrad.torch.SOAP"
    _display_kind = "soap"

    def __init__(self, model, target=None, *, client=None, token=None, tls=None, lr=3e-3,
                 betas=(0.95, 0.95), shampoo_beta=None, eps=1e-8, weight_decay=0.01,
                 precondition_frequency=10, max_precond_dim=10000, correct_bias=True,
                 refresh=None, state_dtype=None, display_name=None, shared_memory=False):
        if shampoo_beta is not None and shampoo_beta < 0:
            shampoo_beta = None  # the reference's "use betas[1]"

        def make_config(name, shape):
            beta1, beta2 = betas
            return _blocks.soap(name, shape, lr=lr, weight_decay=weight_decay, beta1=beta1,
                                beta2=beta2, shampoo_beta=shampoo_beta, eps=eps,
                                precondition_frequency=precondition_frequency,
                                max_precond_dim=max_precond_dim, refresh=refresh,
                                bias_correction=correct_bias)

        self._setup(model, target, client, token, tls, lr, weight_decay, state_dtype,
                    display_name, make_config, shared_memory)
