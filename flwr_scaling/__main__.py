from flwr_scaling.cli import main

main()
