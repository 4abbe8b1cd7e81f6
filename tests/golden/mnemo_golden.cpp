// placeholder: replaced by the golden runner
int main() { return 0; }
