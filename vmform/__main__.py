from vmform.cli import main

main()
