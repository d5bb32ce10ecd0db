"""A deployment node's process next to its SuperNode: the executor that takes the node's
tasks over Flower's task API (`executor`, `task_api`), signed with the node's SuperExec
secret (`secret_file`), and runs them in one warm ClientApp process per FAB
(`warm_clientapp`)."""
