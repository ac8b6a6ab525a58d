"""Deployment: provisioned identities, the TLS server and clients, a local federation.

- :mod:`fedcore.deploy.provision`  federation CA, server certificate, client kits
  (``fedcore provision``);
- :mod:`fedcore.deploy.identity`   load a kit's identity key / the admitted keys,
  sign and verify with them (what secure aggregation plugs into);
- :mod:`fedcore.deploy.guard`      the loopback guard in front of Flower's SuperLink;
- :mod:`fedcore.deploy.server`     ``fedcore server``;
- :mod:`fedcore.deploy.node`       ``fedcore client`` (a SuperNode with its kit);
- :mod:`fedcore.deploy.local`      ``fedcore deploy-local``.

See ``docs/deployment.md``.
"""
