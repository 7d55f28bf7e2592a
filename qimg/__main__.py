from .worker.client import main

main()
