"""The SecAgg+ state machines (Bell et al., CCS 2020), free of any transport.

One round, for participants ``U`` with a public neighbour graph (``graph.py``):

0. **advertise keys** - every node ``u`` draws two X25519 key pairs, ``c_u`` for
   pairwise masks and ``s_u`` for encrypting shares, and a 256-bit self-mask
   seed ``b_u``; it replies with both public keys and a commitment to ``b_u``.
   (Training happens just before, so the encoded input is fixed from here on.)
1. **share keys** - ``u`` Shamir-shares ``b_u`` and the mask private key
   ``c_u.sk`` with threshold ``t`` among its holders (its live neighbours and
   itself) and sends each neighbour its shares, AES-GCM-encrypted under a key
   from ``X25519(s_u, s_v)`` bound to sender, receiver and round.
2. **masked input** - ``u`` sends
   ``y_u = x_u + PRG(b_u) + sum_{v<u} PRG(s_uv) - sum_{v>u} PRG(s_uv)  (mod 2^b)``
   over its neighbours ``v`` still in the round, ``s_uv`` from ``X25519(c_u, c_v)``.
3. **unmask** - the coordinator names the nodes whose ``y`` arrived (``S``) and the
   others (``D``); each node returns, per node it holds shares of, the ``b`` share
   if that node is in ``S`` or the mask-key share if it is in ``D`` - never both,
   not even across repeated requests. The coordinator reconstructs ``b_u``
   (``u`` in ``S``) and ``c_v.sk`` (``v`` in ``D``), verifies them against the
   commitments and public keys, and removes the masks with
   ``O((|S| + |D| k) d)`` PRG expansion.

Double masking is what makes dropouts safe: a node whose ``y`` arrives late is
in ``D``, so only its *pairwise* masks can be removed and ``PRG(b_u)`` keeps it
hidden. :class:`ClientSession` and :class:`ServerSession` are pure state
machines with a valid-transition table; timeouts and transport belong to the
Flower glue, which tells the server session which nodes did not answer.
"""

from __future__ import annotations

from consortium.secagg.client_session import CLIENT_TRANSITIONS, ClientSession
from consortium.secagg.derivation import pairwise_seed, plan_for, seed_commitment, self_mask_seed
from consortium.secagg.errors import SecAggAbort, SecAggError
from consortium.secagg.messages import Stage
from consortium.secagg.server_session import Rejection, SecureSum, ServerSession

__all__ = [
    "CLIENT_TRANSITIONS",
    "ClientSession",
    "Rejection",
    "SecAggAbort",
    "SecAggError",
    "SecureSum",
    "ServerSession",
    "Stage",
    "pairwise_seed",
    "plan_for",
    "seed_commitment",
    "self_mask_seed",
]
