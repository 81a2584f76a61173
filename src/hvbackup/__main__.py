from hvbackup.cli import main

main()
