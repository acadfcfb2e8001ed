from mgdedup.cli import main

main()
