"""A real Flower deployment of the app: one SuperLink and N SuperNodes, TLS and node auth.

* `python -m deploy.prepare --out DIR --num-nodes N`: per-node data files, a CA and server
  certificate, SuperNode key pairs, and the exact commands to start everything by hand.
  With `--node-public-keys KEYS` the nodes' own public keys instead: no private key here.
* `python -m deploy.node_key --out keys`: on a node's machine, its own key pair; only the
  public key is handed over.
* `python -m deploy.he_key generate|open`: under homomorphic encryption, one node makes the
  nodes' shared CKKS key and seals it to each other node's public key, signed with its own
  node key (`open --from` checks the signature); the preparing machine and the SuperLink
  host never hold it (`deploy.prepare --he-keys nodes`).
* `python -m deploy.launch --dir DIR`: starts the SuperLink and the SuperNodes as separate
  processes on 127.0.0.1, runs the app with `flwr run`, collects the results and stops
  every process it started.

See docs/deployment.md.
"""
