"""One module per federated algorithm, each a pair of client and server functions."""
