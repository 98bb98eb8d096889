"""NATS decentralized auth for the mesh (README "Security", DESIGN §9).

* :mod:`mesh.security.jwt`: a small NATS JWT v2 encoder/decoder on ``nkeys``;
* :mod:`mesh.security.permissions`: the permission table (who may publish/subscribe what);
* :mod:`mesh.security.authority`: a loaded security dir issuing user JWTs, enrollment tokens,
  account revocations, and ``.creds`` files;
* :mod:`mesh.security.setup`: ``meshctl security init`` and nats-server configs.
"""

__all__: list[str] = []
