"""Deployment: provisioned identities, the TLS server and clients, a local federation.

Kit key files are read by :mod:`fedcore.storage.keys`.

- :mod:`fedcore.deploy.provision`  federation CA, server certificate, client kits
  (``fedcore provision``);
- :mod:`fedcore.deploy.guard`      the loopback guard in front of Flower's SuperLink;
- :mod:`fedcore.deploy.server`     ``fedcore server``;
- :mod:`fedcore.deploy.node`       ``fedcore client`` (a SuperNode with its kit);
- :mod:`fedcore.deploy.local`      ``fedcore deploy-local``.

See ``docs/deployment.md``.
"""
