"""What server and client both compute, so the client never imports the server's
strategies: update clipping and noise (`clipping`), CKKS keys and the encrypted-update
codec (`ckks`), and the pruning schedule and mask both sides derive (`pruning_mask`)."""
