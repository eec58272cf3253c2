"""The model zoo: plain disttrain.nn code a user can read - MLP (mlp.py, optionally tensor-parallel),
GNMT-style seq2seq (gnmt.py), DLRM-style recommender with local or sharded tables (dlrm.py) and a
small GPT-style transformer, dense or tensor-parallel (transformer.py)."""
