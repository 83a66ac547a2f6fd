"""natgrad.torch.EKFAC: EKFAC (George et al. 2018) through natgrad-server for
torch.nn.Module models, as a torch optimizer::

    opt = natgrad.torch.EKFAC(model, target="localhost:50051", lr=0.1, damping=1e-3)
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss)

It is ``natgrad.torch.KFAC`` with each nn.Linear / nn.Conv2d layer an
``ekfac`` block instead of a ``kfac_dense`` one: the same hooks, statistics,
fallback blocks, param_groups, KL clipping, adaptive damping and
checkpoints (see natgrad.torch). The differences:

* statistics are always sent raw (activations and per-example output
  gradients, every step), since the server estimates EKFAC's scaling from
  the per-example gradients; there is no ``reduce`` argument, and a conv
  layer run on several spatial sizes in one step (which KFAC would send
  reduced) raises InvalidArgument;
* there is no ``damping_mode``, ``stats_period`` or ``async_inversion``: the
  damping is added to the scaling in the eigenbasis, and the scaling needs
  statistics at every step;
* ``report`` calls the layers "kfac" blocks (the K-FAC family); the session's
  blocks are of kind "ekfac".
"""
from natgrad import blocks as _blocks
from natgrad import errors
from natgrad.torch import KFAC

__all__ = ["EKFAC"]

_NOT_FOR_EKFAC = ("reduce", "damping_mode", "stats_period", "async_inversion")


class EKFAC(KFAC):
    """EKFAC through natgrad-server for a torch.nn.Module (optimizer mode).

    Arguments as natgrad.torch.KFAC, without ``reduce``, ``damping_mode``,
    ``stats_period`` and ``async_inversion``. ``inverse_period`` is how often
    the eigenbasis is recomputed (the scaling is re-estimated every step);
    ``ema_decay`` applies to the factors and the scaling alike.
    """

    def __init__(self, model, target=None, **kwargs):
        bad = sorted(k for k in kwargs if k in _NOT_FOR_EKFAC)
        if bad:
            raise TypeError(f"natgrad.torch.EKFAC does not take {bad}: statistics are always "
                            "raw and the damping is added to the scaling in the eigenbasis")
        super().__init__(model, target, reduce=False, **kwargs)

    def _kfac_block_configs(self, lr, momentum, weight_decay):
        a = self._session_args
        return [_blocks.ekfac(
            L.name, L.d_in, L.d_out, bias=L.bias, lr=lr, damping=a["damping"],
            momentum=momentum, weight_decay=weight_decay, ema_decay=a["ema_decay"],
            inverse_period=a["inverse_period"], locations=L.locations or None)
            for L in self.layers.values()]

    def _expected_blocks(self):
        want = super()._expected_blocks()
        for name in self.layers:
            want[name] = ("ekfac", want[name][1])
        return want

    def _layer_input(self, L, step):
        r = super()._layer_input(L, step)
        if r is not None and "a_factor" in r[0]:
            # KFAC's only reason to reduce with reduce=False: one step ran the
            # conv on several spatial sizes, so rows are no longer n*T.
            raise errors.InvalidArgument(
                f"layer '{L.name}': ekfac needs raw statistics, but this step ran the layer on "
                "inputs of different spatial sizes (rows are not n*T); run it on one size per "
                "step or use natgrad.torch.KFAC", block=L.name, field="kfac.raw")
        return r
