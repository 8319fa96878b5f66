from slimopt.cli import main

main()
