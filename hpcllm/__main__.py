from hpcllm.cli import main

main()
