// Tests for mnemo/core/npy.hpp: the golden files load with the shapes their meta.json names,
// save/load round trips (incl. a strided view), every dtype NumPy saves by default read and
// converted as the header's table says (hand-written files, plus NumPy's own when it is
// installed), and malformed files or refused dtypes throw mnemo::error naming
// the file and what was expected and found.
#include "mnemo/core/npy.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <limits>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "mnemo/core/dtype.hpp"
#include "mnemo/core/tensor.hpp"

namespace {

namespace fs = std::filesystem;
namespace npy = mnemo::npy;
using mnemo::tensor;
using mnemo::view;

fs::path golden_dir() {
  if (const char* env = std::getenv("MNEMO_GOLDEN_DIR"); env && *env) return env;
  return MNEMO_GOLDEN_DIR;
}

template <class Fn>
void expect_error(Fn&& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "expected mnemo::error";
  } catch (const mnemo::error& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
  }
}

// A scratch folder under the system temp dir, removed with everything in it at the end.
class scratch_dir {
 public:
  scratch_dir() {
    std::random_device rd;
    path_ = fs::temp_directory_path() / ("mnemo_npy_test_" + std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(path_);
  }
  ~scratch_dir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

// A version-1.0 .npy with the given header dict and raw data bytes.
std::string npy_bytes(const std::string& dict, const std::string& data, const std::string& magic = "\x93NUMPY") {
  std::string header = dict;
  const std::size_t total = magic.size() + 4 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::string out = magic;
  out += '\x01';
  out += '\x00';
  out += static_cast<char>(header.size() & 0xff);
  out += static_cast<char>(header.size() >> 8);
  return out + header + data;
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string float_data(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

// The raw bytes of `v` (this machine is little-endian, as the files are).
template <class T>
std::string raw(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

std::string dict(const std::string& descr, const std::string& shape) {
  return "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
}

TEST(Npy, EveryGoldenFileLoads) {
  const fs::path dir = golden_dir();
  ASSERT_TRUE(fs::is_directory(dir)) << dir;
  int files = 0;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (e.path().extension() != ".npy") continue;
    const npy::array a = npy::load(e.path().string());
    EXPECT_TRUE(a.type == npy::dtype::float32 || a.type == npy::dtype::int64) << e.path();  // README: <f4 or <i8
    EXPECT_EQ(a.bytes.size(), static_cast<std::size_t>(a.size()) * npy::item_size(a.type)) << e.path();
    EXPECT_EQ(fs::file_size(e.path()) % 64, (a.bytes.size() % 64)) << "header not 64-byte padded: " << e.path();
    ++files;
  }
  EXPECT_GT(files, 100);
}

// The shapes the README gives, in terms of the case's params.
TEST(Npy, GoldenShapesMatchMetaParams) {
  const fs::path dir = golden_dir();
  int attention_cases = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (!fs::exists(e.path() / "meta.json")) continue;
    std::ifstream f(e.path() / "meta.json");
    const auto meta = nlohmann::json::parse(f);
    const std::string op = meta.at("op");
    const auto& p = meta.at("params");
    auto file = [&](const std::string& name) { return (e.path() / (name + ".npy")).string(); };
    if (op == "attention_forward" || op == "attention_decode") {
      const std::int64_t B = p.at("B"), Hq = p.at("Hq"), Hkv = p.at("Hkv"), Lq = p.at("Lq"), Lk = p.at("Lk"),
                         D = p.at("D"), Dv = p.at("Dv");
      EXPECT_EQ((npy::load<float, 4>(file("q")).shape()), (mnemo::shape_t<4>{B, Hq, Lq, D})) << e.path();
      EXPECT_EQ((npy::load<float, 4>(file("k")).shape()), (mnemo::shape_t<4>{B, Hkv, Lk, D})) << e.path();
      EXPECT_EQ((npy::load<float, 4>(file("v")).shape()), (mnemo::shape_t<4>{B, Hkv, Lk, Dv})) << e.path();
      EXPECT_EQ((npy::load<float, 4>(file("out")).shape()), (mnemo::shape_t<4>{B, Hq, Lq, Dv})) << e.path();
      EXPECT_EQ((npy::load<float, 3>(file("lse")).shape()), (mnemo::shape_t<3>{B, Hq, Lq})) << e.path();
      if (p.at("alibi").get<bool>()) {
        EXPECT_EQ((npy::load<float, 1>(file("alibi_slopes")).shape()), (mnemo::shape_t<1>{Hq})) << e.path();
      }
      if (op == "attention_decode") {
        EXPECT_EQ(Lq, 1);
      }
      ++attention_cases;
    } else if (op == "landmark_attention") {
      const std::int64_t L = p.at("L");
      const auto is_mem = npy::load<std::int64_t, 1>(file("is_mem"));
      EXPECT_EQ(is_mem.shape(), (mnemo::shape_t<1>{L}));
      for (auto x : is_mem) EXPECT_TRUE(x == 0 || x == 1);
    }
  }
  EXPECT_EQ(attention_cases, 22);
}

TEST(Npy, RoundTripFloat32Float16Int64) {
  scratch_dir tmp;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;

  tensor<float, 3> f({2, 3, 37});
  for (auto& x : f) x = normal(rng);
  npy::save(tmp.file("f.npy"), f);
  const auto f2 = npy::load<float, 3>(tmp.file("f.npy"));
  ASSERT_EQ(f2.shape(), f.shape());
  for (std::int64_t i = 0; i < f.size(); ++i) EXPECT_EQ(f2.data()[i], f.data()[i]);

  tensor<mnemo::f16, 2> h({5, 7});
  for (auto& x : h) x = mnemo::f16(normal(rng));
  npy::save(tmp.file("h.npy"), h);
  const auto h2 = npy::load<mnemo::f16, 2>(tmp.file("h.npy"));
  ASSERT_EQ(h2.shape(), h.shape());
  for (std::int64_t i = 0; i < h.size(); ++i) EXPECT_EQ(h2.data()[i].bits, h.data()[i].bits);
  EXPECT_EQ(npy::load(tmp.file("h.npy")).type, npy::dtype::float16);

  tensor<std::int64_t, 1> n({9});
  for (std::int64_t i = 0; i < 9; ++i) n(i) = (i - 4) * (std::int64_t{1} << 40);
  npy::save(tmp.file("n.npy"), n);
  const auto n2 = npy::load<std::int64_t, 1>(tmp.file("n.npy"));
  ASSERT_EQ(n2.shape(), n.shape());
  for (std::int64_t i = 0; i < 9; ++i) EXPECT_EQ(n2(i), n(i));

  tensor<float, 4> empty({2, 0, 3, 4});
  npy::save(tmp.file("e.npy"), empty);
  EXPECT_EQ((npy::load<float, 4>(tmp.file("e.npy")).shape()), empty.shape());

  // The header numpy expects: version 1.0, dict with a 1-tuple for rank 1, 64-byte aligned data.
  std::ifstream raw(tmp.file("n.npy"), std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(raw)), std::istreambuf_iterator<char>());
  EXPECT_EQ(bytes.substr(0, 8), std::string("\x93NUMPY\x01\x00", 8));
  EXPECT_NE(bytes.find("'descr': '<i8', 'fortran_order': False, 'shape': (9,)"), std::string::npos);
  EXPECT_EQ((bytes.size() - 9 * 8) % 64, 0u);
}

TEST(Npy, SavesAStridedViewInCOrder) {
  // A [B, L, H, D] buffer saved as [B, H, L, D] through permute, then a narrowed slice of it.
  scratch_dir tmp;
  constexpr std::int64_t B = 2, L = 5, H = 3, D = 4;
  tensor<float, 4> blhd({B, L, H, D});
  float x = 0;
  for (auto& e : blhd) e = x++;
  const view<float, 4> bhld = blhd.as_view().permute({0, 2, 1, 3});
  npy::save(tmp.file("p.npy"), bhld);
  const auto back = npy::load<float, 4>(tmp.file("p.npy"));
  ASSERT_EQ(back.shape(), (mnemo::shape_t<4>{B, H, L, D}));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t l = 0; l < L; ++l)
        for (std::int64_t d = 0; d < D; ++d) EXPECT_EQ(back(b, h, l, d), blhd(b, l, h, d));

  const view<const float, 4> slice = bhld.narrow(2, 1, 3).narrow(3, 0, 2).narrow(3, 1, 1);
  npy::save(tmp.file("s.npy"), slice);
  const auto s = npy::load<float, 4>(tmp.file("s.npy"));
  ASSERT_EQ(s.shape(), (mnemo::shape_t<4>{B, H, 3, 1}));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t l = 0; l < 3; ++l) EXPECT_EQ(s(b, h, l, 0), blhd(b, l + 1, h, 1));
}

TEST(Npy, ReadsVersion2Headers) {
  scratch_dir tmp;
  const std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }";
  std::string header = dict;
  header.append((64 - (12 + dict.size() + 1) % 64) % 64, ' ');
  header += '\n';
  std::string bytes = std::string("\x93NUMPY\x02\x00", 8);
  for (int i = 0; i < 4; ++i) bytes += static_cast<char>((header.size() >> (8 * i)) & 0xff);
  bytes += header + float_data({1, 2, 3, 4});
  write_file(tmp.file("v2.npy"), bytes);
  const auto t = npy::load<float, 2>(tmp.file("v2.npy"));
  EXPECT_EQ(t(1, 0), 3.0f);
}

// Files as np.save writes them for NumPy's default dtypes (float64, int64, bool) and the other
// common ones (int32, uint8): the header dict NumPy writes and the raw little-endian items.
TEST(Npy, ReadsEveryDtypeNumPySavesByDefault) {
  scratch_dir tmp;
  // np.save('f8.npy', np.array([[0.1, -2.5, 1e300], [3.0, -0.0, 1e-50]]))
  const auto f8 = tmp.file("f8.npy");
  const std::vector<double> d = {0.1, -2.5, 1e300, 3.0, -0.0, 1e-50};
  write_file(f8, npy_bytes(dict("<f8", "(2, 3)"), raw(d)));
  const npy::array a8 = npy::load(f8);
  EXPECT_EQ(a8.type, npy::dtype::float64);
  EXPECT_EQ(a8.bytes.size(), 48u);
  const auto as_double = npy::load<double, 2>(f8);
  for (std::int64_t i = 0; i < 6; ++i) EXPECT_EQ(as_double.data()[i], d[static_cast<std::size_t>(i)]);
  const auto as_float = npy::load<float, 2>(f8);  // rounded to nearest
  EXPECT_EQ(as_float(0, 0), 0.1f);
  EXPECT_EQ(as_float(0, 1), -2.5f);
  EXPECT_EQ(as_float(0, 2), std::numeric_limits<float>::infinity()) << "1e300 is beyond float's range";
  EXPECT_TRUE(std::signbit(as_float(1, 1)));
  EXPECT_EQ(as_float(1, 2), 0.0f) << "1e-50 is below float's smallest subnormal";
  // Just above float's max: below max + half an ulp rounds to max, at it to inf; NaN stays NaN.
  const double fmax = std::numeric_limits<float>::max();
  const std::vector<double> edge = {fmax * (1 + 1e-9), -(fmax + std::ldexp(1.0, 103)), std::nan("")};
  const auto fe = tmp.file("edge.npy");
  write_file(fe, npy_bytes(dict("<f8", "(3,)"), raw(edge)));
  const auto e = npy::load<float, 1>(fe);
  EXPECT_EQ(e(0), std::numeric_limits<float>::max());
  EXPECT_EQ(e(1), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(e(2)));
  expect_error([&] { npy::load<mnemo::f16, 2>(f8); }, {f8, "expected dtype '<f2'", "got <f8"});
  expect_error([&] { npy::load<std::int64_t, 2>(f8); }, {f8, "'<i8', '<i4', '|u1', '|b1'", "got <f8"});

  // np.save('f2.npy', np.array([1.5, -0.25], dtype=np.float16)) read as float and double (exact).
  const auto f2 = tmp.file("f2.npy");
  const std::vector<std::uint16_t> h = {mnemo::f16(1.5f).bits, mnemo::f16(-0.25f).bits};
  write_file(f2, npy_bytes(dict("<f2", "(2,)"), raw(h)));
  EXPECT_EQ((npy::load<float, 1>(f2)(1)), -0.25f);
  EXPECT_EQ((npy::load<double, 1>(f2)(0)), 1.5);
  EXPECT_EQ((npy::load<double, 1>(tmp.file("f2.npy"))(1)), -0.25);

  // np.save('i4.npy', np.array([-7, 2**31 - 1, -2**31], dtype=np.int32))
  const auto i4 = tmp.file("i4.npy");
  const std::vector<std::int32_t> i32 = {-7, std::numeric_limits<std::int32_t>::max(), std::numeric_limits<std::int32_t>::min()};
  write_file(i4, npy_bytes(dict("<i4", "(3,)"), raw(i32)));
  EXPECT_EQ(npy::load(i4).type, npy::dtype::int32);
  const auto i4_64 = npy::load<std::int64_t, 1>(i4);
  const auto i4_32 = npy::load<std::int32_t, 1>(i4);
  for (std::int64_t i = 0; i < 3; ++i) {
    EXPECT_EQ(i4_64(i), i32[static_cast<std::size_t>(i)]);
    EXPECT_EQ(i4_32(i), i32[static_cast<std::size_t>(i)]);
  }
  expect_error([&] { npy::load<float, 1>(i4); }, {i4, "'<f4', '<f2', '<f8' (read as float)", "got <i4"});
  expect_error([&] { npy::load<std::uint8_t, 1>(i4); }, {i4, "'|u1', '|b1'", "got <i4"});

  // np.save('u1.npy', np.array([[0, 255], [128, 7]], dtype=np.uint8)): '|u1', no byte order.
  const auto u1 = tmp.file("u1.npy");
  write_file(u1, npy_bytes(dict("|u1", "(2, 2)"), std::string("\x00\xff\x80\x07", 4)));
  EXPECT_EQ(npy::load(u1).type, npy::dtype::uint8);
  EXPECT_EQ((npy::load<std::uint8_t, 2>(u1)(0, 1)), 255);
  EXPECT_EQ((npy::load<std::int64_t, 2>(u1)(1, 0)), 128);
  EXPECT_EQ((npy::load<std::int32_t, 2>(u1)(1, 1)), 7);

  // np.save('b1.npy', np.array([True, False, True])): '|b1', one byte per element.
  const auto b1 = tmp.file("b1.npy");
  write_file(b1, npy_bytes(dict("|b1", "(3,)"), std::string("\x01\x00\x01", 3)));
  EXPECT_EQ(npy::load(b1).type, npy::dtype::bool8);
  const auto b = npy::load<std::int64_t, 1>(b1);
  EXPECT_EQ(b(0), 1);
  EXPECT_EQ(b(1), 0);
  EXPECT_EQ(b(2), 1);
  EXPECT_EQ((npy::load<std::uint8_t, 1>(b1)(2)), 1);
  expect_error([&] { npy::load<float, 1>(b1); }, {b1, "got |b1"});

  // np.save('i8.npy', np.arange(3)): NumPy's default int; also read as itself only among ints.
  const auto i8 = tmp.file("i8.npy");
  write_file(i8, npy_bytes(dict("<i8", "(3,)"), raw(std::vector<std::int64_t>{0, 1, 2})));
  EXPECT_EQ((npy::load<std::int64_t, 1>(i8)(2)), 2);
  expect_error([&] { npy::load<std::int32_t, 1>(i8); }, {i8, "'<i4', '|u1', '|b1' (read as std::int32_t)", "got <i8"});

  // A truncated file of a wider dtype counts its items' bytes.
  const auto short_f8 = tmp.file("short_f8.npy");
  write_file(short_f8, npy_bytes(dict("<f8", "(2, 3)"), raw(d).substr(0, 40)));
  expect_error([&] { npy::load(short_f8); }, {short_f8, "truncated", "48", "got 40"});
}

TEST(Npy, RoundTripDoubleInt32Uint8) {
  scratch_dir tmp;
  tensor<double, 2> d({3, 5});
  for (std::int64_t i = 0; i < d.size(); ++i) d.data()[i] = 1.0 / (static_cast<double>(i) + 3.0);
  npy::save(tmp.file("d.npy"), d);
  EXPECT_EQ(npy::load(tmp.file("d.npy")).type, npy::dtype::float64);
  const auto d2 = npy::load<double, 2>(tmp.file("d.npy"));
  for (std::int64_t i = 0; i < d.size(); ++i) EXPECT_EQ(d2.data()[i], d.data()[i]);
  tensor<std::int32_t, 1> n({4});
  for (std::int64_t i = 0; i < 4; ++i) n(i) = static_cast<std::int32_t>(i * 1000003 - 2);
  npy::save(tmp.file("n.npy"), n);
  EXPECT_EQ((npy::load<std::int32_t, 1>(tmp.file("n.npy"))(3)), n(3));
  tensor<std::uint8_t, 1> u({3});
  u(0) = 0;
  u(1) = 200;
  u(2) = 255;
  npy::save(tmp.file("u.npy"), u);
  std::ifstream raw_file(tmp.file("u.npy"), std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(raw_file)), std::istreambuf_iterator<char>());
  EXPECT_NE(bytes.find("'descr': '|u1'"), std::string::npos);
  EXPECT_EQ((npy::load<std::uint8_t, 1>(tmp.file("u.npy"))(1)), 200);
}

// np.save output from NumPy itself, when python3 with numpy is on the machine (skipped otherwise).
TEST(Npy, ReadsFilesNumPyWrote) {
  if (std::system("/usr/bin/python3 -c 'import numpy' > /dev/null 2>&1") != 0) GTEST_SKIP() << "no python3 with numpy";
  scratch_dir tmp;
  const std::string dir = tmp.file("");
  const std::string script = "import numpy as np; d='" + dir +
                             "'; np.save(d+'f8.npy', np.array([[0.5, -1.25], [3.0, 7.0]])); "
                             "np.save(d+'i8.npy', np.arange(5)); np.save(d+'b1.npy', np.array([True, False])); "
                             "np.save(d+'u1.npy', np.array([3, 250], dtype=np.uint8)); "
                             "np.save(d+'i4.npy', np.array([-5, 6], dtype=np.int32))";
  ASSERT_EQ(std::system(("/usr/bin/python3 -c \"" + script + "\"").c_str()), 0);
  EXPECT_EQ((npy::load<float, 2>(tmp.file("f8.npy"))(0, 1)), -1.25f);
  EXPECT_EQ((npy::load<std::int64_t, 1>(tmp.file("i8.npy"))(4)), 4);
  EXPECT_EQ((npy::load<std::int64_t, 1>(tmp.file("b1.npy"))(0)), 1);
  EXPECT_EQ((npy::load<std::uint8_t, 1>(tmp.file("u1.npy"))(1)), 250);
  EXPECT_EQ((npy::load<std::int64_t, 1>(tmp.file("i4.npy"))(0)), -5);
}

TEST(Npy, MalformedFilesThrowNamingFileExpectedAndActual) {
  scratch_dir tmp;
  const std::string good = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  const std::string data6 = float_data({1, 2, 3, 4, 5, 6});

  const auto missing = tmp.file("missing.npy");
  expect_error([&] { npy::load(missing); }, {missing, "cannot open"});

  const auto magic = tmp.file("magic.npy");
  write_file(magic, npy_bytes(good, data6, "\x93NUMPX"));
  expect_error([&] { npy::load(magic); }, {magic, "magic"});

  const auto text = tmp.file("text.npy");
  write_file(text, "hello");
  expect_error([&] { npy::load(text); }, {text, "magic"});

  const auto version = tmp.file("version.npy");
  std::string v9 = npy_bytes(good, data6);
  v9[6] = 9;
  write_file(version, v9);
  expect_error([&] { npy::load(version); }, {version, "version", "got 9"});

  const auto trunc_header = tmp.file("trunc_header.npy");
  write_file(trunc_header, npy_bytes(good, data6).substr(0, 30));
  expect_error([&] { npy::load(trunc_header); }, {trunc_header, "truncated"});

  const auto trunc = tmp.file("trunc.npy");
  write_file(trunc, npy_bytes(good, data6.substr(0, 20)));
  expect_error([&] { npy::load(trunc); }, {trunc, "(2,3,)", "24", "got 20"});

  // A corrupt shape whose element count overflows must not allocate or wrap around.
  const auto huge = tmp.file("huge.npy");
  write_file(huge, npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967297), }", data6));
  expect_error([&] { npy::load(huge); }, {huge, "truncated", "got 24"});

  const auto big_endian = tmp.file("big_endian.npy");
  write_file(big_endian, npy_bytes("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }", data6));
  expect_error([&] { npy::load(big_endian); }, {big_endian, "'<f4'", "got '>f4'"});

  // Dtypes outside the accepted set: the message lists what is read.
  for (const char* d : {"<c8", ">f8", "|i1", "<u4", "|O", "<U3", "=f4"}) {
    const auto other = tmp.file("other.npy");
    write_file(other, npy_bytes(std::string("{'descr': '") + d + "', 'fortran_order': False, 'shape': (3,), }", data6));
    expect_error([&] { npy::load(other); },
                 {other, "'<f4', '<f2', '<f8', '<i8', '<i4', '|u1', '|b1'", std::string("got '") + d + "'"});
  }

  const auto fortran = tmp.file("fortran.npy");
  write_file(fortran, npy_bytes("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", data6));
  expect_error([&] { npy::load(fortran); }, {fortran, "fortran_order False", "got True"});

  const auto no_shape = tmp.file("no_shape.npy");
  write_file(no_shape, npy_bytes("{'descr': '<f4', 'fortran_order': False, }", data6));
  expect_error([&] { npy::load(no_shape); }, {no_shape, "'shape'"});

  const auto bad_shape = tmp.file("bad_shape.npy");
  write_file(bad_shape, npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }", data6));
  expect_error([&] { npy::load(bad_shape); }, {bad_shape, "shape"});

  // Python tuple syntax only: an empty entry, a leading comma or two dimensions without a comma
  // are malformed, not skipped (the fuzzer's "(0,4441444222222222 , , 111)" loaded as 3-D).
  for (const char* s : {"(2, , 3)", "(,2, 3)", "(2 3)", "(2,,)", "(,)"}) {
    const auto malformed = tmp.file("malformed.npy");
    write_file(malformed, npy_bytes(std::string("{'descr': '<f4', 'fortran_order': False, 'shape': ") + s + ", }", data6));
    expect_error([&] { npy::load(malformed); }, {malformed, "malformed shape", s});
  }
  for (const char* s : {"(2, 3)", "( 2 ,3 )", "(2, 3,)", "(6,)", "(6 , )"}) {
    const auto spaced = tmp.file("spaced.npy");
    write_file(spaced, npy_bytes(std::string("{'descr': '<f4', 'fortran_order': False, 'shape': ") + s + ", }", data6));
    EXPECT_EQ(npy::load(spaced).size(), 6) << s;
  }

  // A shape that loads as 1-byte items (element count 0) but whose int64 tensor would need more
  // than 2^63 bytes: the load succeeds, the conversion names the shape.
  const auto wide = tmp.file("wide.npy");
  write_file(wide, npy_bytes("{'descr': '|u1', 'fortran_order': False, 'shape': (0, 44414442222222224, 111), }", ""));
  EXPECT_EQ(npy::load(wide).size(), 0);
  EXPECT_EQ((npy::load<std::uint8_t, 3>(wide).size()), 0);
  expect_error([&] { npy::load<std::int64_t, 3>(wide); }, {"44414442222222224", "2^63"});

  // A valid float32 [2, 3] file asked for as something else.
  const auto ok = tmp.file("ok.npy");
  write_file(ok, npy_bytes(good, data6));
  EXPECT_EQ((npy::load<float, 2>(ok)(1, 2)), 6.0f);
  expect_error([&] { npy::load<std::int64_t, 2>(ok); },
               {ok, "expected dtype '<i8', '<i4', '|u1', '|b1' (read as std::int64_t)", "got <f4"});
  expect_error([&] { npy::load<mnemo::f16, 2>(ok); }, {ok, "expected dtype '<f2' (read as mnemo::f16)", "got <f4"});
  expect_error([&] { npy::load<float, 3>(ok); }, {ok, "expected rank 3", "got rank 2"});
  expect_error([&] { npy::load<float, 1>(ok); }, {ok, "expected rank 1", "got rank 2"});

  expect_error([&] { npy::save(tmp.file("no_such_dir/x.npy"), tensor<float, 1>({3})); }, {"no_such_dir", "writing"});
}

}  // namespace
