"""The model zoo: plain disttrain.nn code a user can read (MLP now; GNMT-style seq2seq, DLRM-style
recommender and a small transformer arrive with the model-parallel work)."""
