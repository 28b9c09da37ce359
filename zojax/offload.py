"""ZO2-style MeZO: the stacked layers in host memory, streamed one layer at a
time per step (see ``zojax/_src/estimators/offload.py``)::

  model = zojax.models.Decoder(...)
  tx = zojax.offload.OffloadedMeZO(zojax.offload.decoder_parts(model), 1e-6)
  host, state = tx.init(params)          # the layers move to host memory
  for tokens in batches:
    host, state = tx.step(host, state, tokens)
  params = tx.gather(host, state)
"""

from __future__ import annotations

from typing import Callable

from zojax import models
from zojax._src.estimators.offload import HostParams
from zojax._src.estimators.offload import OffloadState
from zojax._src.estimators.offload import OffloadedMeZO
from zojax._src.estimators.offload import Parts
from zojax._src.estimators.offload import host_memory

__all__ = ('HostParams', 'OffloadState', 'OffloadedMeZO', 'Parts',
           'decoder_parts', 'host_memory')


def decoder_parts(model: models.Decoder,
                  loss: Callable = models.next_token_loss) -> Parts:
  """The parts of a :class:`zojax.models.Decoder` (tokens as the batch);
  ``loss(logits, tokens)``."""
  return Parts(embed=model.embed_tokens, layer=model.apply_layer,
               logits=model.logits, loss=loss, stacked='blocks')
